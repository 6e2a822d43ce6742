// Audio worklet: taps the microphone (input 0) and the assistant (input 1) in the same
// render quantum, so both recordings share one clock (the echo delay is their lag).
// Posts {levels: [micDb, remoteDb], mic: Float32Array, remote: Float32Array} every
// BLOCK samples. Runs on the audio rendering thread: no allocation per quantum besides
// the block handed over.
const BLOCK = 2048;

class Tap extends AudioWorkletProcessor {
  constructor() {
    super();
    this.mic = new Float32Array(BLOCK);
    this.remote = new Float32Array(BLOCK);
    this.fill = 0;
  }

  process(inputs) {
    const mic = inputs[0] && inputs[0][0];
    const remote = inputs[1] && inputs[1][0];
    const n = (mic || remote || { length: 128 }).length;
    let start = 0;
    while (start < n) {
      const take = Math.min(n - start, BLOCK - this.fill);
      for (let i = 0; i < take; i++) {
        this.mic[this.fill + i] = mic ? mic[start + i] : 0;
        this.remote[this.fill + i] = remote ? remote[start + i] : 0;
      }
      this.fill += take;
      start += take;
      if (this.fill === BLOCK) {
        this.port.postMessage({ levels: [dbfs(this.mic), dbfs(this.remote)], mic: this.mic, remote: this.remote },
                              [this.mic.buffer, this.remote.buffer]);
        this.mic = new Float32Array(BLOCK);
        this.remote = new Float32Array(BLOCK);
        this.fill = 0;
      }
    }
    return true;
  }
}

function dbfs(samples) {
  let sum = 0;
  for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
  const rms = Math.sqrt(sum / samples.length);
  return rms > 0 ? Math.max(-100, 20 * Math.log10(rms)) : -100;
}

registerProcessor("duplexline-tap", Tap);
