// Reply player for omni-voice-chat: a queue of PCM pieces played gaplessly in an AudioContext at the reply's
// rate (24 kHz; the browser resamples to the device). It starts JITTER_S after the first piece arrives: a
// model streams about as fast as it plays, so without that margin every late piece would be a gap. When a
// reply arrives slower than real time, it holds enough audio for the rest of the reply at the arrival rate
// it has seen, guessing the reply's length (MIN_GUESS_S, or twice what had come at the last stall), so it
// does not run dry mid-word; if it still runs dry it fades out, waits, and fades back in.
const FADE = 120; // samples (5 ms at 24 kHz): no click when stalling mid-sound
const JITTER_S = 0.06; // first margin; the reply must start within 0.1 s of its first audio reaching the page
const MAX_JITTER_S = 0.5;
const MAX_LEAD_S = 3.0; // never hold more than this before (re)starting
const BURST_S = 0.05; // pieces this close to the first one arrived with it
const MIN_GUESS_S = 6.0; // a spoken answer's usual length (8 s gave more silence at 1.34x slower than real time)

class OmniPlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.pieces = []; // {turn, samples: Float32Array}
    this.offset = 0; // within pieces[0]
    this.buffered = 0; // samples queued
    this.turn = 0; // the turn being played
    this.played = 0; // samples of this.turn played
    this.ended = new Set(); // turns whose last piece has arrived
    this.flushed = new Set();
    this.waiting = true; // holding until enough is buffered
    this.waitingSince = 0; // currentTime when it began holding
    this.jitter = JITTER_S;
    this.firstArrival = null; // currentTime of this turn's first piece
    this.firstBurst = 0; // samples that came with it (one model step arrives as several socket frames)
    this.guess = 0; // seconds the reply is guessed to last, raised at each stall
    this.arrived = 0; // samples of this turn received
    this.port.onmessage = (event) => this.receive(event.data);
  }

  receive(message) {
    if (message.type === "pcm") {
      if (this.flushed.has(message.turn)) return;
      if (message.turn !== this.turn) this.beginTurn(message.turn);
      if (currentTime - this.firstArrival < BURST_S) this.firstBurst += message.samples.length;
      this.pieces.push({turn: message.turn, samples: message.samples});
      this.buffered += message.samples.length;
      this.arrived += message.samples.length;
    } else if (message.type === "end") {
      if (this.flushed.has(message.turn)) return;
      this.ended.add(message.turn);
      if (message.turn === this.turn && this.buffered === 0) this.finish(true);
    } else if (message.type === "flush") {
      this.flushed.add(message.turn);
      const played = message.turn === this.turn ? this.played : 0;
      if (message.turn === this.turn) this.drop();
      this.port.postMessage({type: "played", turn: message.turn, samples: played, complete: false});
    }
  }

  beginTurn(turn) {
    this.drop();
    this.turn = turn;
    this.played = 0;
    this.arrived = 0;
    this.firstBurst = 0;
    this.guess = 0;
    this.firstArrival = currentTime;
    this.jitter = JITTER_S;
    this.waiting = true;
    this.waitingSince = currentTime;
  }

  drop() {
    this.pieces = [];
    this.offset = 0;
    this.buffered = 0;
    this.waiting = true;
    this.waitingSince = currentTime;
  }

  finish(complete) {
    this.port.postMessage({type: "played", turn: this.turn, samples: this.played, complete});
    this.drop();
    this.ended.delete(this.turn);
    this.turn = 0;
  }

  // Whether to (re)start: all of the reply is here, or the margin has passed and the buffer holds enough that
  // the rest of the reply's guessed length plays out at the arrival rate seen.
  ready() {
    if (this.buffered === 0) return false;
    if (this.ended.has(this.turn)) return true;
    if (currentTime - this.waitingSince < this.jitter) return false;
    // Seconds of audio per second since the first burst (which came at once, so it does not count). Until a
    // piece has come after it, the rate is unknown: play at once the first time, else wait for one.
    const elapsed = currentTime - this.firstArrival;
    if (this.arrived === this.firstBurst) return this.played === 0;
    const rate = (this.arrived - this.firstBurst) / sampleRate / elapsed;
    if (rate >= 1) return true;
    const total = Math.max(MIN_GUESS_S, this.guess); // fixed between stalls, or the target would run away
    const rest = Math.max(0, total - this.played / sampleRate);
    return this.buffered >= Math.min(MAX_LEAD_S, (1 - rate) * rest) * sampleRate;
  }

  process(_, outputs) {
    const out = outputs[0][0];
    if (this.waiting && this.ready()) {
      this.waiting = false;
      if (this.played === 0) this.port.postMessage({type: "started", turn: this.turn, frame: currentFrame});
      this.fadeIn = 0;
    }
    if (this.waiting) return true;
    let i = 0;
    while (i < out.length && this.pieces.length) {
      const piece = this.pieces[0].samples;
      const take = Math.min(out.length - i, piece.length - this.offset);
      for (let k = 0; k < take; k++) {
        const gain = this.fadeIn < FADE ? this.fadeIn++ / FADE : 1;
        const fadeOut = this.buffered - k <= FADE && !this.ended.has(this.turn) ? (this.buffered - k) / FADE : 1;
        out[i + k] = piece[this.offset + k] * gain * fadeOut;
      }
      i += take;
      this.offset += take;
      this.buffered -= take;
      this.played += take;
      if (this.offset === piece.length) {
        this.pieces.shift();
        this.offset = 0;
      }
    }
    if (this.buffered === 0) {
      if (this.ended.has(this.turn)) {
        this.finish(true);
      } else { // ran dry (faded out above): wait for more, guessing a longer reply and a wider margin
        this.waiting = true;
        this.waitingSince = currentTime;
        this.guess = 2 * Math.max(this.guess, this.arrived / sampleRate);
        this.jitter = Math.min(MAX_JITTER_S, 2 * this.jitter);
        this.port.postMessage({type: "stalled", turn: this.turn, played: this.played / sampleRate, arrived: this.arrived / sampleRate, t: currentTime - this.firstArrival});
      }
    }
    return true;
  }
}

registerProcessor("omni-player", OmniPlayer);
