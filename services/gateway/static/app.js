// The voicebus page: one button opens a session, publishes the microphone (WHIP), plays the agent
// (WHEP), and draws captions, the agent's state and each turn's latency from the session's events.
// window.voicebus exposes what the page measured (connection times, audio levels) for tests and curious
// people.

const $ = (id) => document.getElementById(id);
const key = new URLSearchParams(location.search).get("key") || "";

const STATES = {
  idle: "Press the button and say something",
  connecting: "Connecting…",
  listening: "Listening — go ahead",
  hearing: "Hearing you…",
  thinking: "Thinking…",
  speaking: "Speaking",
  ended: "Call ended",
};
const LOUD_RMS = 0.02; // agent audio above this counts as heard
const RECONNECT_MS = 1500; // a leg that stays disconnected this long is set up again
const MAX_RECONNECTS = 5;

const page = {
  state: "idle",
  states: [], // [time, state]: what the page showed, in order
  session: null, // the POST /sessions answer
  token: "",
  events: null,
  mic: null,
  legs: {}, // "mic" | "speaker" -> {pc, attempts, timing: ms to gather, to answer, to connect, total}
  audio: null,
  analysers: {},
  levels: { you: { peak: 0, loudMs: 0, history: [] }, agent: { peak: 0, loudMs: 0, history: [] } },
  turns: new Map(),
  errors: [],
};
window.voicebus = page;

// --- state and notices ------------------------------------------------------------------------------

function setState(state) {
  if (state !== page.state) page.states.push([Date.now(), state]);
  page.state = state;
  $("orb").dataset.state = state;
  $("state").textContent = STATES[state];
}

function notice(text, isError = false) {
  $("notice").textContent = text;
  $("notice").classList.toggle("error", isError);
  if (isError) page.errors.push(text);
}

function authHeaders() {
  const credential = page.token || key;
  return credential ? { Authorization: `Bearer ${credential}` } : {};
}

// --- the call ---------------------------------------------------------------------------------------

async function start() {
  const button = $("talk");
  button.disabled = true;
  setState("connecting");
  notice("");
  try {
    page.audio = new AudioContext();
    const response = await fetch("/sessions", { method: "POST", headers: key ? { Authorization: `Bearer ${key}` } : {} });
    if (response.status !== 201) throw new Error(`could not start a session: ${await response.text()}`);
    page.session = await response.json();
    page.token = page.session.token || key;
    $("session").textContent = `session ${page.session.session}`;
    follow(page.session.events);
    page.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    measure("you", new MediaStream(page.mic.getAudioTracks()));
    await Promise.all([connect("mic"), connect("speaker")]);
    button.dataset.mode = "stop";
    button.textContent = "Hang up";
  } catch (error) {
    notice(error.message || String(error), true);
    await hangUp(false);
  } finally {
    button.disabled = false;
  }
}

async function hangUp(tellServer = true) {
  const session = page.session;
  page.session = null;
  for (const leg of Object.values(page.legs)) leg.pc.close();
  page.legs = {};
  page.events?.close();
  page.mic?.getTracks().forEach((track) => track.stop());
  page.mic = null;
  if (tellServer && session) {
    await fetch(`/sessions/${session.session}`, { method: "DELETE", headers: authHeaders(), keepalive: true }).catch(() => {});
  }
  setLegState("mic", "idle");
  setLegState("speaker", "idle");
  setState(session ? "ended" : "idle");
  $("talk").dataset.mode = "start";
  $("talk").textContent = "Start talking";
}

// --- WHIP / WHEP ------------------------------------------------------------------------------------

function setLegState(name, state) {
  $(`leg-${name}`).dataset.state = state;
}

async function connect(name) {
  const pc = new RTCPeerConnection({ iceServers: [] });
  const leg = { pc, attempts: page.legs[name]?.attempts || 0, timing: {}, connected: false };
  page.legs[name] = leg;
  setLegState(name, "connecting");
  if (name === "mic") {
    pc.addTransceiver(page.mic.getAudioTracks()[0], { direction: "sendonly", streams: [page.mic] });
  } else {
    pc.addTransceiver("audio", { direction: "recvonly" });
    pc.ontrack = (event) => {
      const stream = event.streams[0] || new MediaStream([event.track]);
      $("agent-audio").srcObject = stream; // playing it also feeds the browser's echo canceller
      measure("agent", stream);
    };
  }
  const started = performance.now();
  let answered = started;
  const connected = new Promise((resolve) => {
    pc.onconnectionstatechange = () => {
      const state = pc.connectionState;
      setLegState(name, state === "new" ? "connecting" : state);
      if (state === "connected") {
        leg.timing.connect = performance.now() - answered;
        leg.timing.total = performance.now() - started;
        leg.connected = true;
        leg.attempts = 0;
        resolve();
        if (page.legs.mic?.connected && page.legs.speaker?.connected && page.state === "connecting") {
          setState("listening");
        }
      } else if (state === "failed" || state === "disconnected") {
        setTimeout(() => reconnect(name, pc), RECONNECT_MS);
      }
    };
  });
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc);
  const posted = performance.now();
  leg.timing.gather = posted - started;
  const url = name === "mic" ? page.session.whip : page.session.whep;
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/sdp", ...authHeaders() },
    body: pc.localDescription.sdp,
  });
  if (response.status !== 201) throw new Error(`${name}: ${response.status} ${await response.text()}`);
  const answer = await response.text();
  answered = performance.now();
  leg.timing.answer = answered - posted;
  await pc.setRemoteDescription({ type: "answer", sdp: answer });
  await connected;
}

function gathered(pc, timeoutMs = 1000) {
  // no trickle ICE: the offer goes out with every candidate in it
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => pc.iceGatheringState === "complete" && resolve();
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

async function reconnect(name, pc) {
  // the replica serving this leg went away (or the network did): the gateway sends the new offer to
  // whichever replica owns the session now
  const leg = page.legs[name];
  if (!page.session || !leg || leg.pc !== pc || pc.connectionState === "connected") return;
  if (leg.attempts >= MAX_RECONNECTS) {
    notice(`${name} connection lost`, true);
    return;
  }
  leg.attempts += 1;
  pc.close();
  notice(`reconnecting ${name}…`);
  try {
    await connect(name);
    notice("");
  } catch (error) {
    setTimeout(() => reconnect(name, page.legs[name]?.pc), RECONNECT_MS);
  }
}

// --- audio levels -----------------------------------------------------------------------------------

function measure(who, stream) {
  const analyser = page.audio.createAnalyser();
  analyser.fftSize = 1024;
  page.audio.createMediaStreamSource(stream).connect(analyser);
  page.analysers[who] = analyser;
}

const samples = new Float32Array(1024);
setInterval(() => {
  for (const [who, analyser] of Object.entries(page.analysers)) {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    const rms = Math.sqrt(sum / samples.length);
    const level = page.levels[who];
    level.peak = Math.max(level.peak, rms);
    if (rms > LOUD_RMS) level.loudMs += 20;
    level.history.push([Date.now(), rms]); // the last minute, for whoever wants to look
    if (level.history.length > 3000) level.history.shift();
    $(`meter-${who}`).style.width = `${Math.min(100, Math.sqrt(rms) * 200)}%`;
  }
}, 20);

// --- conversation events ----------------------------------------------------------------------------

function follow(url) {
  const source = new EventSource(page.token ? `${url}?token=${encodeURIComponent(page.token)}` : url);
  source.onmessage = (message) => handle(JSON.parse(message.data));
  page.events = source;
}

function turn(n) {
  if (!page.turns.has(n)) {
    page.turns.set(n, { caller: null, agent: null, segments: new Map(), reply: { generation: -1, chunks: [] }, marks: {} });
  }
  return page.turns.get(n);
}

function bubble(who, label) {
  const item = document.createElement("li");
  item.className = `bubble ${who}`;
  item.innerHTML = `<span class="who">${label}</span><span class="text"></span>`;
  $("captions").append(item);
  item.scrollIntoView({ block: "end", behavior: "smooth" });
  return item;
}

function showCaller(t) {
  t.caller ||= bubble("caller", "you");
  const text = t.caller.querySelector(".text");
  text.replaceChildren();
  for (const { text: words, final } of [...t.segments.values()]) {
    const span = document.createElement("span");
    span.textContent = `${words} `;
    if (!final) span.className = "partial";
    text.append(span);
  }
}

function showAgent(t, heard = null) {
  t.agent ||= bubble("agent", "agent");
  const full = t.reply.chunks.filter((c) => c != null).join(" ");
  const text = t.agent.querySelector(".text");
  text.replaceChildren();
  const spoken = document.createElement("span");
  spoken.textContent = heard ?? full;
  text.append(spoken);
  if (heard != null && full.startsWith(heard) && full.length > heard.length) {
    const rest = document.createElement("span");
    rest.className = "unheard";
    rest.textContent = full.slice(heard.length);
    text.append(rest);
  }
}

function showLatency(n, t) {
  const m = t.marks;
  if (!t.agent || m.speech_end == null || m.first_audio_out == null) return;
  const ms = (a, b) => (m[a] != null && m[b] != null ? Math.round((m[b] - m[a]) / 1e6) : null);
  const total = ms("speech_end", "first_audio_out");
  const parts = [
    ["silence", ms("speech_end", "vad_stop")], // the VAD's wait for the end of speech
    ["STT", ms("stt_told", "stt_final")],
    ["LLM", ms("llm_request", "llm_first_token")],
    ["TTS", ms("tts_text", "tts_first_audio")],
  ].filter(([, v]) => v != null);
  let chip = t.agent.querySelector(".latency");
  if (!chip) {
    chip = document.createElement("span");
    chip.className = "latency";
    t.agent.append(chip);
  }
  chip.innerHTML = `<b>${total} ms</b> to first audio` + parts.map(([k, v]) => ` · ${k} ${v}`).join("");
  chip.title =
    "from the end of your speech to the agent's first audio leaving the server; then the phases: " +
    "waiting for silence, the final transcript, the LLM's first token, the TTS's first audio";
  chip.dataset.ms = total;
}

function handle(event) {
  switch (event.type) {
    case "SpeechStarted":
      if (page.state !== "speaking") setState("hearing");
      break;
    case "SpeechStopped":
      if (page.state === "hearing") setState("listening");
      break;
    case "Transcript": {
      const t = turn(event.turn);
      t.segments.set(event.segment, { text: event.text, final: event.is_final });
      showCaller(t);
      break;
    }
    case "UserTurnEnded": {
      const t = turn(event.turn);
      t.segments = new Map([[0, { text: event.text, final: true }]]);
      showCaller(t);
      setState("thinking");
      break;
    }
    case "ReplyChunk": {
      const t = turn(event.turn);
      if (event.generation > t.reply.generation) t.reply = { generation: event.generation, chunks: [] };
      if (event.generation === t.reply.generation) {
        t.reply.chunks[event.index] = event.text;
        showAgent(t);
        showLatency(event.turn, t);
      }
      break;
    }
    case "PlayoutStarted":
    case "PlayoutResumed":
      setState("speaking");
      break;
    case "PlayoutPaused":
      setState("hearing");
      break;
    case "PlayoutStopped": {
      const t = turn(event.turn);
      if (!event.completed && event.generation === t.reply.generation) showAgent(t, event.heard_text);
      setState("listening");
      break;
    }
    case "TurnMark": {
      const t = turn(event.turn);
      t.marks[event.mark] ??= event.at_ns;
      showLatency(event.turn, t);
      break;
    }
    case "ErrorEvent":
      notice(`${event.stage}: ${event.message}`, true);
      break;
    case "SessionEnded":
      hangUp(false);
      break;
  }
}

// --- wiring -----------------------------------------------------------------------------------------

$("talk").addEventListener("click", () => ($("talk").dataset.mode === "start" ? start() : hangUp()));
window.addEventListener("pagehide", () => page.session && hangUp());
