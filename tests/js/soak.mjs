// soak.mjs URL PID: random mixed traffic against `m3 serve --test-hooks --max-body 65536` for
// SOAK_SECONDS (at most SOAK_MAX_REQUESTS requests, SOAK_CONCURRENCY at a time), sampling the
// server's resident memory and KV pages every SOAK_SAMPLE_SECONDS. Then, once idle: no 5xx seen
// by a client or counted by the server, every valid request answered 2xx with a sane body (forced
// texts exactly), every invalid one 4xx, no KV page held, and resident memory flat: its peak over
// the second half at most max(8 MiB, 5%) above its peak over the first half (a leak of a few
// hundred bytes per request shows over thousands of requests; allocator noise stays below).
import {readFileSync} from 'node:fs';
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import {assert, done, EOT, metric, post, test, toolBlock, waitFor} from './harness.mjs';

const [base, pid] = process.argv.slice(2);
const env = (name, dflt) => Number(process.env[name] ?? dflt);
const SECONDS = env('SOAK_SECONDS', 1800);
const MAX_REQUESTS = env('SOAK_MAX_REQUESTS', 200000);
const CONCURRENCY = env('SOAK_CONCURRENCY', 8);
const SAMPLE_MS = env('SOAK_SAMPLE_SECONDS', 10) * 1000;
// Long generations scale with the run so that a short soak still ends close to its deadline.
const LARGE_TOKENS = Math.max(64, Math.min(1500, SECONDS * 8));
const openai = new OpenAI({baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 600000});
const anthropic = new Anthropic({baseURL: base, apiKey: 'unused', maxRetries: 0, timeout: 600000});
const model = (await openai.models.list()).data[0].id; /* m3-builtin, or the --model's name */

// A seeded generator, so a failing run can be replayed with the SOAK_SEED it prints.
let rngState = env('SOAK_SEED', Date.now() % 2147483647) >>> 0;
const seed0 = rngState;
function rand() {
  rngState = (rngState + 0x6d2b79f5) >>> 0;
  let t = rngState;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const pick = (xs) => xs[Math.floor(rand() * xs.length)];
const chance = (p) => rand() < p;
const int = (lo, hi) => lo + Math.floor(rand() * (hi - lo + 1));
const maxTokens = () => (chance(0.85) ? int(1, 24) : int(64, LARGE_TOKENS));

function sampling() {
  const p = {seed: int(0, 1 << 30)};
  if (chance(0.8)) p.temperature = pick([0, 0.3, 0.7, 1, 1.3, 2]);
  if (chance(0.4)) p.top_p = pick([0.1, 0.5, 0.9, 1]);
  if (chance(0.3)) p.top_k = pick([-1, 0, 1, 5, 50]);
  if (chance(0.2)) p.min_p = pick([0, 0.05, 0.2]);
  if (chance(0.2)) p.repetition_penalty = pick([0.9, 1, 1.2]);
  if (chance(0.2)) p.presence_penalty = pick([-1, 0, 1.5]);
  if (chance(0.2)) p.frequency_penalty = pick([-0.5, 0, 2]);
  if (chance(0.3)) p.ignore_eos = true;
  if (chance(0.2)) p.stop = pick([['e'], ['th', '\n'], ['STOP']]);
  return p;
}

const users = [[{role: 'user', content: 'What is 2+2?'}],
               [{role: 'system', content: 'Be terse.'}, {role: 'user', content: 'Name a colour.'}],
               [{role: 'user', content: 'hi'}, {role: 'assistant', content: 'Hello.'}, {role: 'user', content: 'again'}]];
const tools = [{type: 'function', function: {name: 'get_weather', description: 'Weather for a city',
  parameters: {type: 'object', properties: {location: {type: 'string'}, days: {type: 'integer'}}, required: ['location']}}}];
const atools = tools.map((t) => ({name: t.function.name, description: t.function.description, input_schema: t.function.parameters}));
const think = () => ({chat_template_kwargs: {thinking_mode: pick(['enabled', 'disabled', 'adaptive'])}});
const png = readFileSync(new URL('../fixtures/vision/media/tiny_23x9.png', import.meta.url)).toString('base64');

// Drains an OpenAI stream; returns the text of choice 0 and how many choices finished.
async function drainOpenAI(stream, chat) {
  let text = '', finishes = 0;
  for await (const chunk of stream)
    for (const c of chunk.choices) {
      if (c.index === 0) text += chat ? (c.delta.content ?? '') : c.text;
      if (c.finish_reason) finishes++;
    }
  return {text, finishes};
}

// Each kind sends one request and checks its answer; it returns 'ok' or 'cancelled', and throws
// on a wrong answer (an SDK error carries the HTTP status).
const kinds = {
  async chat() {
    const n = chance(0.2) ? 2 : 1, max = maxTokens();
    const params = {model, messages: pick(users), max_tokens: max, n, ...sampling(),
                    ...(chance(0.3) ? think() : {}), ...(chance(0.2) ? {logprobs: true, top_logprobs: int(0, 5)} : {})};
    if (chance(0.5)) {
      const r = await openai.chat.completions.create(params);
      assert.equal(r.choices.length, n);
      assert.ok(r.usage.completion_tokens >= n && r.usage.completion_tokens <= n * max, 'usage within max_tokens');
    } else {
      const s = await drainOpenAI(await openai.chat.completions.create({...params, stream: true}), true);
      assert.equal(s.finishes, n);
    }
    return 'ok';
  },

  async chatForced() {
    const calls = [['get_weather', {location: pick(['Paris', 'Oslo', 'Lima']), days: int(1, 9)}]];
    const forced = `<mm:think>weather ${int(0, 999)}</mm:think>Checking.${toolBlock(calls)}${EOT}`;
    const params = {model, messages: pick(users), tools, m3_test_forced_text: forced, max_tokens: 400};
    if (chance(0.5)) {
      const m = (await openai.chat.completions.create(params)).choices[0];
      assert.equal(m.finish_reason, 'tool_calls');
      assert.equal(m.message.content, 'Checking.');
      assert.deepEqual(JSON.parse(m.message.tool_calls[0].function.arguments), calls[0][1]);
    } else {
      let args = '', finish = null;
      for await (const chunk of await openai.chat.completions.create({...params, stream: true}))
        for (const c of chunk.choices) {
          for (const t of c.delta.tool_calls ?? []) args += t.function?.arguments ?? '';
          finish = c.finish_reason ?? finish;
        }
      assert.equal(finish, 'tool_calls');
      assert.deepEqual(JSON.parse(args), calls[0][1]);
    }
    return 'ok';
  },

  async completion() {
    const max = maxTokens();
    const prompt = chance(0.7) ? pick(['Once upon a time', 'hello', 'The quick brown fox', ' ']) : [int(1, 200), int(1, 200)];
    const params = {model, prompt, max_tokens: max, ...sampling(),
                    ...(chance(0.2) ? {logprobs: int(0, 5)} : {})};
    if (chance(0.5)) {
      const r = await openai.completions.create(params);
      assert.ok(r.usage.completion_tokens >= 1 && r.usage.completion_tokens <= max, 'usage within max_tokens');
    } else {
      assert.equal((await drainOpenAI(await openai.completions.create({...params, stream: true}), false)).finishes, 1);
    }
    return 'ok';
  },

  // A forced text comes back exactly: a lost, repeated or crossed chunk shows.
  async completionForced() {
    const text = `soak ${int(0, 1e6)} ${'xy'.repeat(int(0, 40))} end`;
    const params = {model, prompt: `say ${int(0, 99)}`, m3_test_forced_text: text + EOT};
    const got = chance(0.5) ? (await openai.completions.create(params)).choices[0].text
                            : (await drainOpenAI(await openai.completions.create({...params, stream: true}), false)).text;
    assert.equal(got, text);
    return 'ok';
  },

  async messages() {
    const max = maxTokens();
    const params = {model, messages: [{role: 'user', content: pick(['hi', 'What is 2+2?', 'Tell me a story.'])}],
                    max_tokens: max, ...(chance(0.5) ? {system: 'Be terse.'} : {}),
                    ...(chance(0.5) ? {temperature: pick([0, 0.5, 1])} : {}),
                    ...(chance(0.3) ? {thinking: chance(0.5) ? {type: 'enabled', budget_tokens: 1024} : {type: 'disabled'}} : {})};
    const m = chance(0.5) ? await anthropic.messages.create(params) : await anthropic.messages.stream(params).finalMessage();
    assert.ok(m.usage.output_tokens >= 1 && m.usage.output_tokens <= max, 'usage within max_tokens');
    return 'ok';
  },

  async messagesForced() {
    const input = {location: pick(['Rome', 'Cairo']), days: int(1, 5)};
    const params = {model, messages: [{role: 'user', content: 'weather?'}], tools: atools, max_tokens: 400,
                    m3_test_forced_text: `<mm:think>look it up</mm:think>Let me check.${toolBlock([['get_weather', input]])}${EOT}`};
    const m = chance(0.5) ? await anthropic.messages.create(params) : await anthropic.messages.stream(params).finalMessage();
    assert.deepEqual(m.content.map((b) => b.type), ['thinking', 'text', 'tool_use']);
    assert.deepEqual(m.content[2].input, input);
    assert.equal(m.stop_reason, 'tool_use');
    return 'ok';
  },

  async image() {
    const r = await openai.chat.completions.create({model, max_tokens: int(1, 8), ...sampling(),
      messages: [{role: 'user', content: [{type: 'text', text: 'describe'},
                                          {type: 'image_url', image_url: {url: `data:image/png;base64,${png}`}}]}]});
    assert.ok(r.usage.completion_tokens >= 1);
    return 'ok';
  },

  // The client hangs up after a few chunks; the server must cancel and free the pages.
  async cancelStream() {
    const k = int(1, 6);
    let seen = 0;
    if (chance(0.5)) {
      const stream = await openai.completions.create({model, prompt: 'hi', max_tokens: 3000, ignore_eos: true, stream: true});
      for await (const _ of stream) if (++seen >= k) break;
    } else {
      const stream = await anthropic.messages.create({model, messages: [{role: 'user', content: 'hi'}],
                                                      max_tokens: 3000, stream: true});
      for await (const _ of stream) if (++seen >= k) break;
    }
    return 'cancelled';
  },

  // The client gives up waiting for a non-streamed answer.
  async cancelWait() {
    const ac = new AbortController();
    const pending = openai.chat.completions.create({model, messages: pick(users), max_tokens: 2000,
                                                    ignore_eos: true}, {signal: ac.signal});
    setTimeout(() => ac.abort(), int(20, 800));
    try {
      await pending;
      return 'ok'; /* it finished before the abort */
    } catch (err) {
      if (err.status) throw err;
      return 'cancelled';
    }
  },

  async invalid() {
    const cases = [
      ['/v1/chat/completions', '{"messages": ['],
      ['/v1/chat/completions', {messages: users[0], temperature: 'hot'}],
      ['/v1/chat/completions', {messages: users[0], temperature: 3}],
      ['/v1/chat/completions', {messages: 'hi'}],
      ['/v1/chat/completions', {messages: users[0], model: 'gpt-4'}],
      ['/v1/chat/completions', {messages: users[0], max_tokens: 0}],
      ['/v1/chat/completions', {messages: users[0], n: 99}],
      ['/v1/chat/completions', {messages: users[0], tool_choice: 'required'}],
      ['/v1/chat/completions', {messages: [{role: 'user', content: [{type: 'image_url', image_url: {url: 'data:image/png;base64,aGVsbG8='}}]}]}],
      ['/v1/completions', {prompt: Array.from({length: 5000}, () => 100)}],
      ['/v1/completions', {prompt: 'x', echo: true}],
      ['/v1/completions', {prompt: [1, -5]}],
      ['/v1/completions', {prompt: 'x', max_tokens: 4096}],
      ['/v1/completions', {prompt: 'x'.repeat(70000)}], /* over --max-body */
      ['/v1/messages', {messages: users[0]}],
      ['/v1/messages', '{'],
      ['/v1/messages', {max_tokens: 5, messages: [{role: 'robot', content: 'x'}]}],
      ['/v1/messages', {max_tokens: 5, messages: [{role: 'user', content: [{type: 'image', source: {type: 'base64', media_type: 'image/bmp', data: png}}]}]}],
      ['/tokenize', {}],
      ['/detokenize', {tokens: ['a']}],
      ['/v1/nothing', {}],
      ['/health', {}], /* POST to a GET endpoint */
    ];
    const [path, body] = pick(cases);
    const r = await post(`${base}${path}`, body);
    assert.ok(r.status >= 400 && r.status < 500, `${path} ${JSON.stringify(body).slice(0, 80)}: status ${r.status}`);
    return 'ok';
  },

  async misc() {
    const text = pick(['hello <mm:think> world', 'héllo wörld ✓', '']);
    const t = await post(`${base}/tokenize`, {prompt: text});
    assert.equal(t.status, 200);
    const d = await post(`${base}/detokenize`, {tokens: t.body.tokens});
    assert.equal(d.body.prompt, text);
    for (const path of ['/health', '/v1/models', '/metrics']) assert.equal((await fetch(`${base}${path}`)).status, 200);
    return 'ok';
  },
};
const weights = {chat: 6, chatForced: 3, completion: 5, completionForced: 4, messages: 4, messagesForced: 2,
                 image: 1, cancelStream: 2, cancelWait: 1, invalid: 3, misc: 2};
const wheel = Object.entries(weights).flatMap(([k, w]) => Array(w).fill(k));

// Per kind: requests, outcomes, and the first few failures (printed at the end).
const tally = Object.fromEntries(Object.keys(kinds).map((k) => [k, {n: 0, ok: 0, cancelled: 0, s4xx: 0, s5xx: 0, other: 0, ms: 0}]));
const failures = [];

async function one(kind) {
  const row = tally[kind], t0 = Date.now();
  row.n++;
  try {
    row[await kinds[kind]()]++;
  } catch (err) {
    if (err.status >= 500) row.s5xx++;
    else if (err.status >= 400) row.s4xx++;
    else row.other++;
    if (failures.length < 20) failures.push(`${kind}: ${err.status ?? ''} ${err.message ?? err}`.slice(0, 300));
  }
  row.ms += Date.now() - t0;
}

function rssKiB() {
  return Number(readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+)/)[1]);
}

const samples = []; /* {t seconds, rss KiB, pages used, in flight} */
async function sample(t0) {
  samples.push({t: (Date.now() - t0) / 1000, rss: rssKiB(), pages: await metric(base, 'm3_kv_pages_used'),
                inFlight: await metric(base, 'm3_http_requests_in_flight')});
}

console.log(`soak: ${SECONDS} s, at most ${MAX_REQUESTS} requests, ${CONCURRENCY} at a time, SOAK_SEED=${seed0}`);
const t0 = Date.now(), end = t0 + SECONDS * 1000;
let issued = 0;
await sample(t0);
const sampler = setInterval(() => sample(t0).catch((e) => failures.push(`sampling: ${e.message}`)), SAMPLE_MS);
await Promise.all(Array.from({length: CONCURRENCY}, async () => {
  while (Date.now() < end && issued < MAX_REQUESTS) {
    issued++;
    await one(pick(wheel));
  }
}));
clearInterval(sampler);
const loadSeconds = (Date.now() - t0) / 1000;
await waitFor('the server to go idle', async () =>
  await metric(base, 'm3_http_requests_in_flight') === 0 && await metric(base, 'm3_kv_pages_used') === 0, 60000).catch(() => {});
await sample(t0);

console.log(`\n${issued} requests in ${loadSeconds.toFixed(0)} s\n`);
console.log('kind               requests      ok  cancel     4xx     5xx   other  mean ms');
for (const [k, r] of Object.entries(tally))
  console.log(`${k.padEnd(16)} ${[r.n, r.ok, r.cancelled, r.s4xx, r.s5xx, r.other, r.n ? Math.round(r.ms / r.n) : 0]
    .map((v) => String(v).padStart(8)).join('')}`);
const half = samples.filter((s) => s.t <= loadSeconds / 2), second = samples.filter((s) => s.t > loadSeconds / 2);
const peak = (xs) => Math.max(...xs.map((s) => s.rss));
const last = samples.at(-1);
console.log(`\nsamples ${samples.length}, every ${SAMPLE_MS / 1000} s; RSS KiB: start ${samples[0].rss}, ` +
            `peak first half ${peak(half)}, peak second half ${peak(second)}, idle at end ${last.rss}`);
console.log(`KV pages used: peak ${Math.max(...samples.map((s) => s.pages))}, at end ${last.pages}`);
for (const f of failures) console.log(`  ${f}`);

await test('no 5xx seen by a client', async () => {
  assert.equal(Object.values(tally).reduce((a, r) => a + r.s5xx, 0), 0);
});
await test('no 5xx counted by the server, no request finished in error', async () => {
  assert.equal(await metric(base, 'm3_http_responses_total{class="5xx"}'), 0);
  assert.equal(await metric(base, 'm3_requests_finished_total{reason="error"}'), 0);
});
await test('every request answered as expected (valid 2xx and right, invalid 4xx)', async () => {
  assert.equal(Object.values(tally).reduce((a, r) => a + r.s4xx + r.other, 0), 0, failures.join('\n'));
});
await test('idle at the end: nothing in flight, every KV page free', async () => {
  assert.equal(last.inFlight, 0);
  assert.equal(last.pages, 0);
});
// Under ASan every finished connection thread leaves allocator state behind, so resident memory
// says nothing there (as in load.mjs); LeakSanitizer at the server's exit checks instead.
if (!process.env.ASAN_OPTIONS) await test('memory flat over the second half', async () => {
  const growth = peak(second) - peak(half), bound = Math.max(8192, peak(half) * 0.05);
  console.log(`RSS growth over the second half: ${growth} KiB (bound ${Math.round(bound)} KiB)`);
  assert.ok(second.length > 0 && growth <= bound, `RSS grew ${growth} KiB`);
});

done('soak');
