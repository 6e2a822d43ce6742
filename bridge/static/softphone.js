// duplexline softphone: one WebRTC call to the bridge, no build step, no network beyond
// the page's own server.
//
//   Call   -> getUserMedia -> RTCPeerConnection (+ data channel "events") -> offer
//          -> POST /webrtc/offer -> answer -> connected
//   data channel in:  {"event": kind, "data": {...}}  text, turn, latency, dtmf, hangup, error
//   data channel out: {"type": "dtmf", "digits"} | {"type": "hangup"}
//   Hang up -> DELETE /webrtc/calls/{id}, close the peer connection.
//
// `window.softphone` exposes the call's state, events and the last seconds of both
// directions' audio (same clock, for the echo delay) to tests and to the curious.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEEP_SECONDS = 20;
  const STATS_MS = 1000; // RTT and loss from the browser's own getStats: costs the server nothing
  const DISCONNECT_GRACE_MS = 5000;
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  const options = new URLSearchParams(location.search);

  const MESSAGES = {
    "server-full": "The line is busy: every seat is taken. Try again in a minute.",
    "busy": "The assistant is busy with other callers. Try again in a minute.",
    "draining": "The server is restarting. Try again shortly.",
    "too-many-pending": "Many calls are connecting right now. Try again in a moment.",
    "too-many-pending-source": "Calls from your network are still connecting. Try again in a moment.",
    "unauthorized": "This line needs an access token: open the link you were given (ending in #token=...).",
    "peer-failed": "The server could not set up the call.",
  };

  const phone = {
    state: "idle", callId: null, error: null, events: [], transcript: "", latencyMs: null, firstAudioMs: null,
    rttMs: null, lossPct: null, turn: null, levels: [-100, -100], peaks: [-100, -100], sampleRate: null, keysSent: "",
    mic: [], remote: [],
  };
  window.softphone = phone;

  let pc = null, channel = null, stream = null, ctx = null, tap = null, timers = [], started = 0;
  let disconnectTimer = null, hangingUp = false;

  function setState(state, text) {
    phone.state = state;
    $("phone").dataset.state = state;
    if (text) $("status").textContent = text;
    const live = state === "calling" || state === "in-call";
    $("call").disabled = live || state === "ending";
    $("hangup").disabled = !live;
    for (const b of document.querySelectorAll(".keypad button")) b.disabled = state !== "in-call";
  }

  function showError(code, message) {
    phone.error = { code, message };
    $("error").textContent = message;
    $("error").hidden = false;
  }

  function clearError() {
    phone.error = null;
    $("error").hidden = true;
  }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    if (token) headers["Authorization"] = "Bearer " + token;
    return headers;
  }

  // ---- audio: meters and recording ------------------------------------------------

  async function startTap(local) {
    ctx = new AudioContext({ latencyHint: "interactive" });
    phone.sampleRate = ctx.sampleRate;
    await ctx.audioWorklet.addModule("/static/tap-worklet.js");
    tap = new AudioWorkletNode(ctx, "duplexline-tap", { numberOfInputs: 2, numberOfOutputs: 1 });
    ctx.createMediaStreamSource(local).connect(tap, 0, 0);
    const mute = ctx.createGain();
    mute.gain.value = 0; // keeps the tap pulled by the graph; the <audio> element plays the call
    tap.connect(mute).connect(ctx.destination);
    const keep = Math.ceil(KEEP_SECONDS * ctx.sampleRate / 2048);
    tap.port.onmessage = ({ data }) => {
      phone.levels = data.levels;
      phone.peaks = phone.peaks.map((p, i) => Math.max(p, data.levels[i]));
      phone.mic.push(data.mic);
      phone.remote.push(data.remote);
      if (phone.mic.length > keep) { phone.mic.shift(); phone.remote.shift(); }
      showLevel("level-out", data.levels[0]);
      showLevel("level-in", data.levels[1]);
    };
    if (ctx.state !== "running") await ctx.resume();
  }

  // The assistant's track joins the tap when it arrives (after the answer).
  function tapRemote(track) {
    if (ctx && tap) ctx.createMediaStreamSource(new MediaStream([track])).connect(tap, 0, 1);
  }

  function showLevel(id, db) {
    $(id).value = Math.max(-60, db);
    $(id + "-db").textContent = db <= -60 ? "\u2212\u221e dB" : db.toFixed(0) + " dB";
  }

  // The last `seconds` of both directions as base64 little-endian int16 (for tests).
  phone.recording = (seconds) => {
    const blocks = Math.min(phone.mic.length, Math.ceil(seconds * (phone.sampleRate || 48000) / 2048));
    const pack = (list) => {
      const chunk = list.slice(list.length - blocks);
      const out = new Int16Array(chunk.length * 2048);
      chunk.forEach((b, k) => { for (let i = 0; i < b.length; i++) out[k * 2048 + i] = Math.max(-32768, Math.min(32767, Math.round(b[i] * 32767))); });
      let s = "";
      const bytes = new Uint8Array(out.buffer);
      for (let i = 0; i < bytes.length; i += 8192) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192));
      return btoa(s);
    };
    return { rate: phone.sampleRate, mic: pack(phone.mic), remote: pack(phone.remote) };
  };

  // ---- the call -------------------------------------------------------------------

  async function call() {
    if (pc) return;
    clearError();
    hangingUp = false;
    phone.events = []; phone.transcript = ""; phone.latencyMs = null; phone.firstAudioMs = null; phone.rttMs = null; phone.lossPct = null;
    phone.mic = []; phone.remote = []; phone.keysSent = ""; phone.keysHeard = ""; phone.peaks = [-100, -100];
    $("transcript").textContent = ""; $("keys-sent").textContent = "";
    for (const id of ["call-id", "turn", "latency", "first-audio", "rtt", "loss", "duration"]) $(id).textContent = "\u2013";
    setState("calling", "Asking for the microphone\u2026");
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      return fail("insecure", "The microphone needs a secure page: open it over https:// or from localhost.");
    }
    const aec = options.get("aec") !== "0";
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: aec, noiseSuppression: aec, autoGainControl: aec }, video: false });
    } catch (err) {
      if (err.name === "NotAllowedError" || err.name === "SecurityError") {
        return fail("no-mic", "Microphone permission was refused. Allow it (the icon in the address bar) and call again.");
      }
      if (err.name === "NotFoundError" || err.name === "OverconstrainedError") {
        return fail("no-mic", "No microphone was found. Plug one in and call again.");
      }
      return fail("no-mic", "The microphone could not be opened (" + err.name + "): is another program using it?");
    }
    setState("calling", "Calling\u2026");
    let config = { ice_servers: [] };
    try {
      const r = await fetch("/webrtc/config", { headers: authHeaders(), cache: "no-store" });
      const body = await r.json().catch(() => ({}));
      if (!r.ok) return fail(body.error || "http-" + r.status, MESSAGES[body.error] || body.message || ("Server error " + r.status));
      config = body;
    } catch (err) {
      return fail("network", "Cannot reach the server. Check the connection and call again.");
    }
    pc = new RTCPeerConnection({ iceServers: config.ice_servers || [] });
    const remote = new MediaStream();
    $("remote").srcObject = remote;
    pc.ontrack = (ev) => { remote.addTrack(ev.track); tapRemote(ev.track); };
    for (const track of stream.getTracks()) pc.addTrack(track, stream);
    channel = pc.createDataChannel("events", { ordered: true });
    channel.onmessage = (ev) => onMessage(ev.data);
    channel.onclose = () => { if (phone.state === "in-call" && !hangingUp) lost("The call was closed by the server."); };
    pc.onconnectionstatechange = onConnectionState;
    try {
      await startTap(stream);
    } catch (err) {
      console.warn("level meters off:", err); // the call works without them
    }
    let answer;
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await iceGathered(pc, 3000);
      const r = await fetch("/webrtc/offer", {
        method: "POST", cache: "no-store",
        headers: authHeaders({ "Content-Type": "application/json" }),
        body: JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp }),
      });
      answer = await r.json().catch(() => ({}));
      if (!r.ok) {
        let message = MESSAGES[answer.error] || answer.message || ("The server answered " + r.status + ".");
        if (answer.retry_after) message += " (retry in " + answer.retry_after + " s)";
        return fail(answer.error || "http-" + r.status, message);
      }
    } catch (err) {
      return fail("network", "Cannot reach the server. Check the connection and call again.");
    }
    phone.callId = answer.call_id;
    $("call-id").textContent = answer.call_id.slice(0, 8);
    $("call-id").title = answer.call_id;
    try {
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    } catch (err) {
      return fail("bad-answer", "The server's answer could not be used: " + err.message);
    }
    setState("calling", "Connecting\u2026");
  }

  function iceGathered(peer, timeoutMs) {
    if (peer.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { if (peer.iceGatheringState === "complete") { clearTimeout(t); resolve(); } };
      const t = setTimeout(resolve, timeoutMs); // host candidates come at once; STUN may not
      peer.addEventListener("icegatheringstatechange", done);
    });
  }

  function onConnectionState() {
    const s = pc && pc.connectionState;
    if (s === "connected") {
      clearTimeout(disconnectTimer);
      if (phone.state !== "in-call") {
        started = Date.now();
        setState("in-call", "In call. Speak any time: the assistant listens while it talks.");
        timers.push(setInterval(tick, STATS_MS));
        timers.push(setInterval(() => { $("duration").textContent = formatDuration((Date.now() - started) / 1000); }, 1000));
      } else {
        setState("in-call", "In call.");
      }
    } else if (s === "disconnected" && phone.state === "in-call") {
      setState("in-call", "The connection is unstable\u2026");
      disconnectTimer = setTimeout(() => lost("The connection was lost."), DISCONNECT_GRACE_MS);
    } else if (s === "failed") {
      lost(phone.state === "in-call" ? "The connection was lost." : "The call could not connect (no network path to the server's media).");
    }
  }

  function onMessage(text) {
    let msg;
    try { msg = JSON.parse(text); } catch (e) { return; }
    const kind = msg.event, data = msg.data || {};
    phone.events.push({ kind, data, at: Date.now() });
    if (kind === "text") {
      phone.transcript += data.text;
      const t = $("transcript");
      t.textContent = phone.transcript;
      t.scrollTop = t.scrollHeight;
    } else if (kind === "turn") {
      phone.turn = data.assistant;
      $("turn").textContent = data.assistant;
    } else if (kind === "latency") {
      phone.latencyMs = data.response_ms;
      $("latency").textContent = Math.round(data.response_ms) + " ms";
      if (typeof data.first_audio_ms === "number") {
        phone.firstAudioMs = data.first_audio_ms;
        $("first-audio").textContent = Math.round(data.first_audio_ms) + " ms";
      }
    } else if (kind === "dtmf") {
      $("keys-sent").textContent = "Keys heard by the line: " + (phone.keysHeard = (phone.keysHeard || "") + data.digits);
    } else if (kind === "hangup") {
      hangingUp = true;
      end("The call was ended by the server (" + data.reason + ").");
    } else if (kind === "error") {
      console.warn("line says:", data.message);
    }
  }

  async function tick() {
    if (!pc || phone.state !== "in-call") return;
    try {
      const report = await pc.getStats();
      report.forEach((s) => {
        if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded" && s.currentRoundTripTime !== undefined) {
          phone.rttMs = s.currentRoundTripTime * 1000;
        } else if (s.type === "inbound-rtp" && s.kind === "audio") {
          const expected = s.packetsReceived + s.packetsLost; // what the bridge sent us, lost included
          if (expected > 0) phone.lossPct = 100 * Math.max(0, s.packetsLost) / expected;
        }
      });
    } catch (e) { /* the call is ending */ }
    if (phone.rttMs !== null) $("rtt").textContent = phone.rttMs.toFixed(0) + " ms";
    if (phone.lossPct !== null) $("loss").textContent = phone.lossPct.toFixed(1) + " %";
  }

  function formatDuration(s) {
    const m = Math.floor(s / 60), r = Math.floor(s % 60);
    return m + ":" + String(r).padStart(2, "0");
  }

  function sendKey(key) {
    if (!channel || channel.readyState !== "open" || phone.state !== "in-call") return;
    channel.send(JSON.stringify({ type: "dtmf", digits: key }));
    phone.keysSent += key;
  }

  async function hangup() {
    if (hangingUp) return;
    hangingUp = true;
    const id = phone.callId;
    setState("ending", "Hanging up\u2026");
    if (channel && channel.readyState === "open") channel.send(JSON.stringify({ type: "hangup" }));
    if (id) {
      // The server ends the call first, so it records a hang-up rather than a lost line;
      // bounded, because a dead server must not keep the page in a call.
      const abort = new AbortController();
      const timer = setTimeout(() => abort.abort(), 2000);
      try {
        await fetch("/webrtc/calls/" + encodeURIComponent(id), { method: "DELETE", headers: authHeaders(), signal: abort.signal });
      } catch (e) { /* closing the peer connection below tells the server anyway */ }
      clearTimeout(timer);
    }
    end("Call ended.");
  }

  function lost(text) {
    if (hangingUp || phone.state === "ended" || phone.state === "failed") return;
    showError("connection-lost", text + " Call again to reconnect.");
    teardown();
    setState("failed", "Disconnected.");
  }

  function fail(code, message) {
    showError(code, message);
    teardown();
    setState("failed", "The call did not go through.");
  }

  function end(text) {
    teardown();
    setState("ended", text);
  }

  function teardown() {
    for (const t of timers) clearInterval(t);
    timers = [];
    clearTimeout(disconnectTimer);
    if (channel) { channel.onclose = null; try { channel.close(); } catch (e) {} }
    if (pc) { pc.onconnectionstatechange = null; pc.close(); }
    if (stream) for (const t of stream.getTracks()) t.stop();
    if (ctx) ctx.close().catch(() => {});
    pc = channel = stream = ctx = tap = null;
    showLevel("level-out", -100);
    showLevel("level-in", -100);
  }

  $("call").addEventListener("click", () => { call().catch((err) => fail("error", "Unexpected error: " + err.message)); });
  $("hangup").addEventListener("click", hangup);
  for (const b of document.querySelectorAll(".keypad button")) b.addEventListener("click", () => sendKey(b.dataset.key));
  document.addEventListener("keydown", (ev) => {
    if (/^[0-9*#]$/.test(ev.key) && phone.state === "in-call") sendKey(ev.key);
  });
  window.addEventListener("pagehide", () => {
    if (phone.callId && phone.state === "in-call") {
      fetch("/webrtc/calls/" + encodeURIComponent(phone.callId), { method: "DELETE", headers: authHeaders(), keepalive: true });
    }
  });
  setState("idle");
})();
