// omni-voice-chat's live client (runs as the live panel's js_on_load; `element` is the panel). It owns the
// microphone (one getUserMedia per conversation, echo-cancelled), the reply player (an AudioWorklet in a
// 24 kHz "interactive" AudioContext) and the WebSocket to the app (live_protocol.py has the messages).
// The page's Python side drives it through window.omniLive: prepare() on the Start click (the user's
// gesture unlocks audio), connect(token) when the app has made the token, stop() on the Stop click.
(() => {
  const settings = JSON.parse(element.querySelector("[data-live-settings]").dataset.liveSettings);
  const meter = element.querySelector("#level .fill");
  const note = element.querySelector("#live-note");
  const base = document.baseURI;

  const live = {
    events: [], // what happened when, on the wall clock (tests and benchmarks read it)
    micSettings: null,
    socket: null,
    stream: null,
    capture: null,
    playback: null,
    player: null,
    micClock: [], // [end sample, wall ms] of recent frames: when each bit of the stream was heard
    turns: new Map(), // turn -> {speechEndMs}
    flushed: new Set(),
    stopping: false,
  };

  const wallMs = (performanceMs) => performance.timeOrigin + performanceMs;
  const log = (type, fields = {}) => live.events.push({type, at: Date.now() / 1000, ...fields});
  const say = (text) => { note.textContent = text; note.hidden = !text; };
  const send = (message) => {
    if (live.socket && live.socket.readyState === WebSocket.OPEN) live.socket.send(message);
  };

  async function openMicrophone() {
    const wanted = {noiseSuppression: true, autoGainControl: true, channelCount: 1};
    // "all" also cancels audio the page itself plays (our player), not only WebRTC peers; older browsers
    // refuse the string, so fall back to the plain flag.
    for (const echoCancellation of ["all", true]) {
      try {
        return await navigator.mediaDevices.getUserMedia({audio: {...wanted, echoCancellation}});
      } catch (error) {
        if (error.name !== "TypeError" && error.name !== "OverconstrainedError") throw error;
      }
    }
    throw new Error("the browser refused every microphone setting");
  }

  // Re-entrant: a second click while the first is still opening the microphone gets the same promise.
  function prepare() {
    live.preparing ??= openAudio().finally(() => { live.preparing = null; });
    return live.preparing;
  }

  async function openAudio() {
    say("");
    live.stopping = false;
    release();
    try {
      if (!live.playback) {
        live.playback = new AudioContext({sampleRate: settings.replySampleRate, latencyHint: "interactive"});
        await live.playback.audioWorklet.addModule(new URL("live-client/player-worklet.js", base));
        live.player = new AudioWorkletNode(live.playback, "omni-player", {outputChannelCount: [1]});
        live.player.connect(live.playback.destination);
        live.player.port.onmessage = (event) => fromPlayer(event.data);
      }
      await live.playback.resume(); // inside the user's click: the autoplay policy allows it now
      live.stream = await openMicrophone();
      if (live.stopping) return release(); // Stop was clicked while the browser asked for the microphone
      const track = live.stream.getAudioTracks()[0];
      live.micSettings = track.getSettings();
      live.capture = new AudioContext({sampleRate: settings.micSampleRate, latencyHint: "interactive"});
      await live.capture.audioWorklet.addModule(new URL("live-client/capture-worklet.js", base));
      const node = new AudioWorkletNode(live.capture, "omni-capture", {
        numberOfOutputs: 0, processorOptions: {frameSamples: settings.micFrameSamples},
      });
      node.port.onmessage = (event) => fromMicrophone(event.data);
      live.capture.createMediaStreamSource(live.stream).connect(node);
      await live.capture.resume();
      if (live.stopping) return release();
      log("prepared", {echoCancellation: live.micSettings.echoCancellation});
    } catch (error) {
      say(`The microphone could not be opened: ${error.message || error}. Allow it for this page and click Start again.`);
      log("failed", {message: String(error)});
      release();
    }
  }

  // The token can come before the microphone is open (the browser may still be asking the user).
  async function connect(token) {
    if (!token) return;
    await live.preparing;
    if (!live.stream || live.stopping) return;
    live.socket?.close(1000);
    const url = new URL("live", base);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    live.socket = socket;
    live.micClock = [];
    live.sent = 0; // samples sent: the app's clock for this conversation
    live.refusal = null;
    socket.onopen = () => { socket.send(JSON.stringify({type: "hello", token})); log("connected"); };
    socket.onmessage = (event) => fromApp(event.data);
    socket.onerror = () => log("socket-error");
    socket.onclose = (event) => {
      log("closed", {code: event.code});
      if (live.socket !== socket) return;
      live.socket = null;
      if (!live.stopping) {
        say(live.refusal  // the app's own sentence, when it closed the socket for a reason
          || "The live audio connection to the app was lost (a network or proxy problem). Click Start to talk again.");
        stopPlayback();
        release();
      }
    };
  }

  function fromMicrophone({pcm, level}) {
    if (live.socket && live.socket.readyState === WebSocket.OPEN) {
      live.socket.send(pcm);
      live.sent += pcm.byteLength / 2;
      live.micClock.push([live.sent, wallMs(performance.now())]);
      if (live.micClock.length > 1000) live.micClock.splice(0, 500); // ~16 s back is plenty
    }
    const db = 20 * Math.log10(level + 1e-9);
    meter.style.width = `${Math.max(0, Math.min(100, (db + 60) * (100 / 60)))}%`;
  }

  // When the page got microphone sample `sample` (wall ms), from the frame that carried it.
  function heardAt(sample) {
    const entry = live.micClock.find(([end]) => end >= sample);
    if (!entry) return null;
    return entry[1] - ((entry[0] - sample) / settings.micSampleRate) * 1000;
  }

  function fromApp(data) {
    if (data instanceof ArrayBuffer) {
      const turn = new DataView(data).getUint32(0, true);
      if (live.flushed.has(turn)) return;
      const pcm = new Int16Array(data, 4);
      const samples = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
      if (!live.turns.get(turn)?.firstAudio) {
        live.turns.set(turn, {...live.turns.get(turn), firstAudio: Date.now()});
        log("first-audio", {turn});
      }
      live.player.port.postMessage({type: "pcm", turn, samples}, [samples.buffer]);
      return;
    }
    const message = JSON.parse(data);
    if (message.type === "turn") {
      const speechEndMs = heardAt(Math.round(message.speech_end_s * settings.micSampleRate));
      live.turns.set(message.turn, {speechEndMs});
      log("turn-end", {turn: message.turn, speechEnd: speechEndMs / 1000, utterance: message.utterance_s});
    } else if (message.type === "reply_end") {
      if (live.flushed.has(message.turn)) return;
      live.player.port.postMessage({type: "end", turn: message.turn});
      log("reply-end", {turn: message.turn, engineFirstAudio: message.engine_first_audio_s});
    } else if (message.type === "flush") {
      live.flushed.add(message.turn);
      live.player.port.postMessage({type: "flush", turn: message.turn});
      log("flush", {turn: message.turn});
    } else if (message.type === "error") {
      live.refusal = message.message;
    }
  }

  function fromPlayer(message) {
    if (message.type === "started") {
      // The sample at context frame `frame` becomes audible at the output timestamp's mapping of its time.
      const stamp = live.playback.getOutputTimestamp();
      const at = wallMs(stamp.performanceTime + (message.frame / live.playback.sampleRate - stamp.contextTime) * 1000);
      const speechEndMs = live.turns.get(message.turn)?.speechEndMs;
      log("sounding", {turn: message.turn, sounding: at / 1000});
      if (speechEndMs) send(JSON.stringify({type: "sounding", turn: message.turn, after_s: Math.max(0, (at - speechEndMs) / 1000)}));
    } else if (message.type === "played") {
      live.turns.set(message.turn, {...live.turns.get(message.turn), done: true});
      log("played", {turn: message.turn, samples: message.samples, complete: message.complete});
      send(JSON.stringify({type: "played", turn: message.turn, samples: message.samples, complete: message.complete}));
    } else if (message.type === "stalled") {
      log("stalled", {turn: message.turn, played: message.played, arrived: message.arrived, t: message.t});
    }
  }

  function stopPlayback() {
    for (const [turn, known] of live.turns) {
      if (!known.done && !live.flushed.has(turn)) {
        live.flushed.add(turn);
        live.player?.port.postMessage({type: "flush", turn});
      }
    }
  }

  function release() {
    live.stream?.getTracks().forEach((track) => track.stop());
    live.stream = null;
    live.capture?.close();
    live.capture = null;
    meter.style.width = "0%";
  }

  function stop() {
    live.stopping = true;
    stopPlayback(); // silent at once; the player reports what was heard, sent before "stop" below
    const socket = live.socket;
    setTimeout(() => {
      if (socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify({type: "stop"}));
      socket?.close(1000);
      if (live.socket === socket) live.socket = null;
    }, 50);
    release();
    log("stopped");
  }

  window.omniLive = {prepare, connect, stop, state: live};
})();
