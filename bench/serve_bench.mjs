// serve_bench.mjs: load generator for `m3 serve` in the style of `vllm bench serve`.
//
//   node bench/serve_bench.mjs --url http://127.0.0.1:8000 [--num-prompts 64]
//        [--max-concurrency 8] [--request-rate inf] [--input-len 128] [--output-len 64]
//        [--endpoint completions|chat] [--api-key K] [--seed 0]
//
// Random prompts of exactly --input-len token ids (completions) or of that many words (chat),
// --output-len tokens each (ignore_eos), streamed. Requests start at --request-rate per second
// (Poisson arrivals; inf = all at once) with at most --max-concurrency in flight. Prints request
// and token throughput and TTFT, TPOT, ITL (mean, median, p99), as vLLM does. Node 18+, no
// packages needed.

function parseArgs(argv) {
  const a = {url: 'http://127.0.0.1:8000', numPrompts: 64, maxConcurrency: 8, requestRate: Infinity,
             inputLen: 128, outputLen: 64, endpoint: 'completions', apiKey: null, seed: 0};
  const strings = ['url', 'endpoint', 'apiKey'];
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '').replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!(key in a) || i + 1 >= argv.length) {
      console.error(`unknown or incomplete option ${argv[i]}; see the comment at the top`);
      process.exit(2);
    }
    const v = argv[i + 1];
    a[key] = strings.includes(key) ? v : v === 'inf' ? Infinity : Number(v);
    if (Number.isNaN(a[key])) {
      console.error(`${argv[i]}: not a number`);
      process.exit(2);
    }
  }
  if (!['completions', 'chat'].includes(a.endpoint)) {
    console.error('--endpoint: completions or chat');
    process.exit(2);
  }
  return a;
}

// A small deterministic PRNG (mulberry32) so runs with one seed send the same prompts.
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const pct = (xs, p) => {
  if (!xs.length) return NaN;
  const s = [...xs].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
};
const median = (xs) => {
  if (!xs.length) return NaN;
  const s = [...xs].sort((x, y) => x - y), m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const mean = (xs) => (xs.length ? xs.reduce((x, y) => x + y, 0) / xs.length : NaN);

async function oneRequest(a, body) {
  const headers = {'content-type': 'application/json'};
  if (a.apiKey) headers.authorization = `Bearer ${a.apiKey}`;
  const path = a.endpoint === 'chat' ? '/v1/chat/completions' : '/v1/completions';
  const t0 = performance.now();
  const r = await fetch(a.url + path, {method: 'POST', headers, body: JSON.stringify(body)});
  if (r.status !== 200) return {ok: false, error: `HTTP ${r.status}: ${await r.text()}`};
  const decoder = new TextDecoder();
  let buf = '', ttft = null, last = null, usage = null;
  const itl = [];
  for await (const bytes of r.body) {
    buf += decoder.decode(bytes, {stream: true});
    let at;
    while ((at = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, at);
      buf = buf.slice(at + 2);
      if (!event.startsWith('data: ') || event === 'data: [DONE]') continue;
      const chunk = JSON.parse(event.slice(6));
      if (chunk.usage) usage = chunk.usage;
      const c = chunk.choices?.[0];
      const text = c ? (c.text ?? c.delta?.content ?? c.delta?.reasoning_content ?? '') : '';
      if (!text) continue;
      const now = performance.now();
      if (ttft === null) ttft = now - t0;
      else itl.push(now - last);
      last = now;
    }
  }
  const e2e = performance.now() - t0;
  if (!usage || ttft === null) return {ok: false, error: 'no tokens or no usage in the stream'};
  const out = usage.completion_tokens;
  return {ok: true, ttft, itl, e2e, tpot: out > 1 ? (e2e - ttft) / (out - 1) : null,
          input: usage.prompt_tokens, output: out};
}

async function main() {
  const a = parseArgs(process.argv.slice(2));
  const rand = rng(a.seed);
  const models = await (await fetch(`${a.url}/v1/models`, {headers: a.apiKey ? {authorization: `Bearer ${a.apiKey}`} : {}})).json();
  const model = models.data[0].id;
  const vocab = 256; // byte-level ids every BPE vocabulary has
  const bodies = Array.from({length: a.numPrompts}, (_, i) => {
    const common = {model, max_tokens: a.outputLen, ignore_eos: true, stream: true,
                    stream_options: {include_usage: true}, temperature: 0, seed: a.seed + i};
    if (a.endpoint === 'chat') {
      const words = Array.from({length: a.inputLen}, () => `w${Math.floor(rand() * 1000)}`).join(' ');
      return {...common, messages: [{role: 'user', content: words}]};
    }
    return {...common, prompt: Array.from({length: a.inputLen}, () => 1 + Math.floor(rand() * (vocab - 1)))};
  });
  console.log(`${a.numPrompts} requests, input ${a.inputLen}, output ${a.outputLen}, ` +
              `rate ${a.requestRate}/s, max concurrency ${a.maxConcurrency}, endpoint ${a.endpoint}, model ${model}`);
  const results = [];
  let inFlight = 0, next = 0;
  const t0 = performance.now();
  await new Promise((resolve) => {
    let arrival = 0;
    const launch = () => {
      while (inFlight < a.maxConcurrency && next < bodies.length && performance.now() - t0 >= arrival) {
        const body = bodies[next++];
        inFlight++;
        oneRequest(a, body).then((res) => results.push(res), (err) => results.push({ok: false, error: String(err)}))
          .finally(() => {
            inFlight--;
            if (results.length === bodies.length) resolve();
            else launch();
          });
        if (Number.isFinite(a.requestRate)) arrival += -Math.log(1 - rand()) / a.requestRate * 1000;
      }
      if (next < bodies.length && inFlight < a.maxConcurrency)
        setTimeout(launch, Math.max(0, arrival - (performance.now() - t0)));
    };
    launch();
  });
  const secs = (performance.now() - t0) / 1000;
  const ok = results.filter((r) => r.ok);
  for (const r of results.filter((x) => !x.ok).slice(0, 3)) console.log(`failed: ${r.error}`);
  const input = ok.reduce((s, r) => s + r.input, 0), output = ok.reduce((s, r) => s + r.output, 0);
  const row = (k, v) => console.log(k.padEnd(40) + (typeof v === 'number' ? v.toFixed(2) : v));
  const section = (t) => console.log(t.padStart(25 + t.length / 2, '-').padEnd(50, '-'));
  console.log('============ Serving Benchmark Result ============');
  row('Successful requests:', String(ok.length));
  row('Failed requests:', String(results.length - ok.length));
  row('Benchmark duration (s):', secs);
  row('Total input tokens:', String(input));
  row('Total generated tokens:', String(output));
  row('Request throughput (req/s):', ok.length / secs);
  row('Output token throughput (tok/s):', output / secs);
  row('Total token throughput (tok/s):', (input + output) / secs);
  const stats = (name, label, xs) => {
    section(name);
    row(`Mean ${label} (ms):`, mean(xs));
    row(`Median ${label} (ms):`, median(xs));
    row(`P99 ${label} (ms):`, pct(xs, 99));
  };
  stats('Time to First Token', 'TTFT', ok.map((r) => r.ttft));
  stats('Time per Output Token (excl. 1st token)', 'TPOT', ok.map((r) => r.tpot).filter((x) => x !== null));
  stats('Inter-token Latency', 'ITL', ok.flatMap((r) => r.itl));
  console.log('==================================================');
  process.exit(results.length === ok.length ? 0 : 1);
}

main().catch((e) => {
  console.error(`serve_bench: ${e.message}`);
  process.exit(1);
});
