// Microphone capture for omni-voice-chat: runs in an AudioContext at the channel's rate (16 kHz; the browser
// resamples the microphone into it) and posts fixed-size frames of 16-bit PCM, with the frame's RMS level for
// the page's meter.
class OmniCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.frameSamples = options.processorOptions.frameSamples;
    this.frame = new Int16Array(this.frameSamples);
    this.filled = 0;
    this.energy = 0;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    for (let i = 0; i < input.length; i++) {
      const sample = Math.max(-1, Math.min(1, input[i]));
      this.energy += sample * sample;
      this.frame[this.filled++] = sample < 0 ? sample * 32768 : sample * 32767;
      if (this.filled === this.frameSamples) {
        const level = Math.sqrt(this.energy / this.frameSamples);
        this.port.postMessage({pcm: this.frame.buffer, level}, [this.frame.buffer]);
        this.frame = new Int16Array(this.frameSamples);
        this.filled = 0;
        this.energy = 0;
      }
    }
    return true;
  }
}

registerProcessor("omni-capture", OmniCapture);
