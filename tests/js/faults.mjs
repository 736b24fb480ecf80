// faults.mjs URL PID: m3 serve run with --threads 1 --test-hooks --kv-memory 1 --max-running 8
// --grace 0 --max-body 65536 (215 KV pages of 4 tokens: an 860-token context) under faults:
// clients that vanish at random points of a stream or of their request, KV pages exhausted,
// prompts over the context, 1000 tiny requests, slow readers, truncated, huge and non-UTF-8
// bodies. After each the server still answers exactly and, once idle, holds no KV page. The faults
// run twice; resident memory after the second run stays within 16 MiB of the first. Last, SIGTERM
// during generation (--grace 0: what runs is cancelled at once): OpenAI streams end with a
// finish chunk ("abort" for those cut short) and [DONE], an Anthropic stream with an
// overloaded_error event, a non-streamed request gets 503, a client that reads nothing does not
// hold the exit up, and the process is gone within 20 s (the shell checks its status is 0).
import net from 'node:net';
import {readFileSync} from 'node:fs';
import {assert, done, EOT, metric, post, test, waitFor} from './harness.mjs';

const [base, pid] = process.argv.slice(2);
const {hostname, port} = new URL(base);
const json = {'content-type': 'application/json'};
// Sanitizer runtimes keep freed memory in quarantine and per-thread state: RSS says nothing there
// (the sanitizers check leaks and races themselves).
const sanitized = Boolean(process.env.ASAN_OPTIONS || process.env.TSAN_OPTIONS);

// xorshift32: "random" points that replay the same on every run.
let seed = 2463534242;
function rand(n) {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return (seed >>> 0) % n;
}

function rssKiB() {
  return Number(readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+)/)[1]);
}

async function idle() {
  await waitFor('the server to go idle', async () =>
    await metric(base, 'm3_http_requests_in_flight') === 0 &&
    await metric(base, 'm3_num_requests_running') === 0 &&
    await metric(base, 'm3_num_requests_waiting') === 0 &&
    await metric(base, 'm3_kv_pages_used') === 0, 30000);
}

async function finishedTotal() {
  let sum = 0;
  for (const r of ['stop', 'length', 'cancelled', 'error'])
    sum += await metric(base, `m3_requests_finished_total{reason="${r}"}`);
  return sum;
}

// The server still answers, exactly: a forced text comes back as it was.
async function answers() {
  const text = `still here ${rand(1000)}`;
  const r = await post(`${base}/v1/completions`, {prompt: 'ping', m3_test_forced_text: text + EOT});
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.equal(r.body.choices[0].text, text);
}

// The data payloads of an SSE text: parsed JSON, or the string '[DONE]'.
function events(text) {
  return text.split('\n\n').map((e) => e.split('\n').find((l) => l.startsWith('data: '))).filter(Boolean)
    .map((l) => (l === 'data: [DONE]' ? '[DONE]' : JSON.parse(l.slice(6))));
}

// Bytes on a fresh connection, then the write side closed; resolves with all the server sent
// until it closed the connection ('' when it sent nothing).
function raw(bytes) {
  return new Promise((resolve) => {
    let got = '';
    const sock = net.connect(Number(port), hostname, () => sock.end(bytes));
    sock.on('data', (d) => { got += d.toString('latin1'); });
    sock.on('error', () => {}); /* a reset after the reply is still a closed connection */
    sock.on('close', () => resolve(got));
  });
}

// Bytes on a fresh connection, then gone at once (a reset, not a polite close).
function vanish(bytes) {
  return new Promise((resolve) => {
    const sock = net.connect(Number(port), hostname, () => sock.write(bytes, () => sock.resetAndDestroy()));
    sock.on('error', () => {});
    sock.on('close', resolve);
  });
}

function request(path, body, extra = '') {
  const b = Buffer.isBuffer(body) ? body : Buffer.from(body);
  return Buffer.concat([Buffer.from(`POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n` +
                                    `Content-Length: ${b.length}\r\nConnection: close\r\n${extra}\r\n`), b]);
}

// The body of a chunked HTTP reply (headers included in `reply`).
function dechunk(reply) {
  let body = '';
  for (let i = reply.indexOf('\r\n\r\n') + 4; ;) {
    const eol = reply.indexOf('\r\n', i), size = parseInt(reply.slice(i, eol), 16);
    if (!(size > 0)) return body;
    body += reply.slice(eol + 2, eol + 2 + size);
    i = eol + 2 + size + 2;
  }
}

function statusOf(reply) {
  const m = reply.match(/^HTTP\/1\.1 (\d+)/);
  return m ? Number(m[1]) : 0;
}

async function vanishingStreams(count) {
  const before = await finishedTotal();
  await Promise.all(Array.from({length: count}, async (_, i) => {
    const words = 1 + rand(40), stopAt = rand(words + 3); /* 0: right after the headers */
    const ac = new AbortController();
    const res = await fetch(`${base}/v1/completions`, {
      method: 'POST', headers: json, signal: ac.signal,
      body: JSON.stringify({prompt: `vanish ${i}`, stream: true, m3_test_forced_text: 'ab '.repeat(words) + EOT})});
    assert.equal(res.status, 200);
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let text = '';
    while (text.split('\n\n').length - 1 < stopAt) {
      const {value, done: end} = await reader.read();
      if (end) break;
      text += dec.decode(value, {stream: true});
    }
    ac.abort();
  }));
  // Clients gone while sending their request, or right after: never started, or cancelled.
  const whole = request('/v1/completions', JSON.stringify({prompt: 'gone', max_tokens: 500, ignore_eos: true}));
  await Promise.all(Array.from({length: 16}, (_, i) => {
    const part = i < 8 ? whole.subarray(0, rand(whole.length)) : whole;
    return i % 2 ? raw(part) : vanish(part);
  }));
  await idle();
  const after = await finishedTotal();
  assert.ok(after >= before + count, `every started stream ended (${after - before} of at least ${count})`);
  await answers();
}

// Greedy generations alone, then 4 requests at once with 8 greedy samples each on 8 running
// places in 215 pages: the 8 samples of one request alone need 8 x 30 pages past their shared
// prompt, so whatever the timing they are preempted, and the requests queue for running places.
// Every sample must still get the text its prompt gets alone.
async function pagesExhausted() {
  const ask = (i, n) => post(`${base}/v1/completions`, {prompt: `page fault ${i}`, max_tokens: 118, n,
                                                        ignore_eos: true, temperature: 0});
  const alone = [];
  for (let i = 0; i < 4; i++) alone.push((await ask(i, 1)).body.choices[0].text);
  const preemptions = await metric(base, 'm3_preemptions_total');
  const together = await Promise.all(Array.from({length: 4}, (_, i) => ask(i, 8)));
  for (let i = 0; i < 4; i++) {
    assert.equal(together[i].status, 200, JSON.stringify(together[i].body));
    assert.equal(together[i].body.usage.completion_tokens, 8 * 118);
    for (const c of together[i].body.choices) {
      assert.equal(c.finish_reason, 'length');
      assert.equal(c.text, alone[i], `request ${i} sample ${c.index}: the same text as alone`);
    }
  }
  assert.ok(await metric(base, 'm3_preemptions_total') > preemptions, 'the pages ran out');
  await idle();
  await answers();
}

async function overContext() {
  const ctx = (await (await fetch(`${base}/v1/models`)).json()).data[0].max_model_len;
  assert.equal(ctx, 860);
  const ids = (n) => Array.from({length: n}, (_, i) => 10 + (i % 400));
  for (const stream of [false, true]) {
    const r = await post(`${base}/v1/completions`, {prompt: ids(ctx), max_tokens: 1, stream});
    assert.equal(r.status, 400);
    assert.match(r.body.error.message, /maximum context length is 860 tokens; the prompt is 860 tokens/);
    const m = await post(`${base}/v1/messages`, {messages: [{role: 'user', content: 'word '.repeat(2000)}],
                                                 max_tokens: 1, stream});
    assert.equal(m.status, 400);
    assert.equal(m.body.error.type, 'invalid_request_error');
  }
  const over = await post(`${base}/v1/completions`, {prompt: ids(ctx - 2), max_tokens: 5});
  assert.equal(over.status, 400);
  assert.equal(over.body.error.param, 'max_tokens');
  // Without max_tokens the context's end ends the generation.
  const fits = await post(`${base}/v1/completions`, {prompt: ids(ctx - 3), ignore_eos: true});
  assert.equal(fits.status, 200, JSON.stringify(fits.body));
  assert.equal(fits.body.choices[0].finish_reason, 'length');
  assert.equal(fits.body.usage.completion_tokens, 3);
  await idle();
  await answers();
}

// Many small requests of every kind from 16 keep-alive clients; each gets its own right answer.
async function tinyRequests(total) {
  const kinds = [
    async (i) => {
      const r = await post(`${base}/v1/completions`, {prompt: `t${i}`, m3_test_forced_text: `${i}` + EOT});
      assert.equal(r.status, 200);
      assert.equal(r.body.choices[0].text, `${i}`);
    },
    async () => assert.equal((await fetch(`${base}/health`)).status, 200),
    async (i) => {
      const r = await post(`${base}/detokenize`, {tokens: [100 + (i % 300)]});
      assert.equal(r.status, 200);
      assert.equal(typeof r.body.prompt, 'string');
    },
    async () => assert.equal((await post(`${base}/v1/chat/completions`, '{"messages": [')).status, 400),
    async () => assert.equal((await fetch(`${base}/nowhere`)).status, 404),
  ];
  let next = 0;
  await Promise.all(Array.from({length: 16}, async () => {
    for (let i = next++; i < total; i = next++) await kinds[i % kinds.length](i);
  }));
  await idle();
  await answers();
}

// A client that reads nothing while its large stream is generated: others are served meanwhile,
// and it then gets every byte; one that never reads and leaves is cancelled.
async function slowReaders() {
  const body = JSON.stringify({prompt: 'slow', n: 4, max_tokens: 300, ignore_eos: true, logprobs: 5,
                               stream: true, stream_options: {include_usage: true}});
  const submitted = await metric(base, 'm3_engine_requests_total');
  let got = '';
  const sock = net.connect(Number(port), hostname, () => sock.write(request('/v1/completions', body)));
  sock.pause();
  const closed = new Promise((resolve) => sock.on('close', resolve));
  sock.on('error', () => {});
  await answers();
  // The engine is done with it while its reader has read nothing.
  await waitFor('the slow stream to be generated', async () =>
    await metric(base, 'm3_engine_requests_total') === submitted + 2 &&
    await metric(base, 'm3_num_requests_running') === 0 && await metric(base, 'm3_num_requests_waiting') === 0);
  sock.on('data', (d) => { got += d.toString('latin1'); });
  sock.resume();
  await closed;
  const ev = events(dechunk(got));
  assert.equal(ev.at(-1), '[DONE]');
  const usage = ev.at(-2).usage;
  assert.equal(usage.completion_tokens, 1200);
  const tokens = ev.slice(0, -2).reduce((n, e) => n + e.choices.reduce((k, c) => k + (c.logprobs?.tokens.length ?? 0), 0), 0);
  assert.equal(tokens, 1200, 'every token streamed once');

  const quiet = net.connect(Number(port), hostname, () => quiet.write(request('/v1/completions',
    JSON.stringify({prompt: 'quiet', max_tokens: 850, ignore_eos: true, stream: true, logprobs: 5}))));
  quiet.pause();
  quiet.on('error', () => {});
  await waitFor('the quiet stream to hold pages', async () => await metric(base, 'm3_kv_pages_used') > 0);
  quiet.resetAndDestroy();
  await idle();
  await answers();
}

async function badBodies() {
  const cases = [
    // [what, raw request, expected status (0: the connection closes without a reply)]
    ['body shorter than its Content-Length', request('/v1/completions', '{"prompt": "hi"}').subarray(0, 120), [0, 400]],
    ['JSON cut short', request('/v1/completions', '{"prompt": "hi", "max_tok'), [400]],
    ['headers cut short', Buffer.from('POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le'), [0, 400]],
    ['Content-Length far over --max-body', Buffer.from('POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n' +
                                                       'Content-Length: 1000000000000\r\n\r\n{"messages"'), [413]],
    ['chunked body over --max-body', Buffer.concat([
      Buffer.from('POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n'),
      ...Array.from({length: 20}, () => Buffer.from(`1000\r\n${' '.repeat(4096)}\r\n`)),
      Buffer.from('0\r\n\r\n')]), [413]],
    ['a byte that is no UTF-8', request('/v1/completions', Buffer.from('{"prompt": "h\xffi", "max_tokens": 1}', 'latin1')), [400]],
    ['an overlong UTF-8 encoding', request('/v1/completions', Buffer.from('{"prompt": "\xc0\xaf", "max_tokens": 1}', 'latin1')), [400]],
    ['an encoded surrogate', request('/v1/messages', Buffer.from('{"messages": [{"role": "user", "content": "\xed\xa0\x80"}], "max_tokens": 1}', 'latin1')), [400]],
    ['non-UTF-8 in the model name', request('/v1/completions', Buffer.from('{"model": "\xfe", "prompt": "hi"}', 'latin1')), [400]],
    ['a lone surrogate escape', request('/v1/completions', '{"prompt": "\\ud800", "max_tokens": 1}'), [400]],
  ];
  for (const [what, bytes, want] of cases) {
    const reply = await raw(bytes);
    assert.ok(want.includes(statusOf(reply)), `${what}: got ${JSON.stringify(reply.slice(0, 200))}`);
    if (statusOf(reply) === 400 && /UTF-8|surrogate|encoding|name/.test(what)) {
      const body = reply.slice(reply.indexOf('\r\n\r\n') + 4);
      assert.ok(!/[\x80-\xff]/.test(body), `${what}: the error body is ASCII JSON (${body})`);
    }
  }
  const text = 'naïve 日本語 🙂';
  const r = await post(`${base}/v1/completions`, {prompt: text, m3_test_forced_text: text + EOT});
  assert.equal(r.status, 200);
  assert.equal(r.body.choices[0].text, text, 'valid UTF-8 of every length passes');
  await idle();
  await answers();
}

const rss = [];
for (let round = 1; round <= 2; round++) {
  await test(`round ${round}: clients vanishing at random points`, () => vanishingStreams(48));
  await test(`round ${round}: KV pages exhausted: requests queue and are preempted, none fail`, pagesExhausted);
  await test(`round ${round}: prompts over the context`, overContext);
  await test(`round ${round}: 1000 tiny requests`, () => tinyRequests(1000));
  await test(`round ${round}: slow readers`, slowReaders);
  await test(`round ${round}: truncated, huge and non-UTF-8 bodies`, badBodies);
  rss.push(rssKiB());
  console.log(`round ${round}: server RSS ${rss.at(-1)} KiB`);
}
if (!sanitized) await test('memory back to its level after the first round', async () => {
  const growth = rss[1] - rss[0];
  assert.ok(growth < 16384, `RSS grew ${growth} KiB (${rss.join(' -> ')})`);
});

await test('SIGTERM during generation: streams end, waiting requests get 503, the process exits', async () => {
  const body = {prompt: 'term', max_tokens: 850, ignore_eos: true};
  const sse = (path, b) => fetch(`${base}${path}`, {method: 'POST', headers: json, body: JSON.stringify({...b, stream: true})})
    .then(async (r) => events(await r.text()));
  const streams = Array.from({length: 6}, () => sse('/v1/completions', body));
  // Each generation needs over 210 of the 215 pages (the chat one has a 545-token prompt): they
  // run one at a time, in order of arrival, so those that come after the first streams never end.
  await waitFor('six in flight', async () => await metric(base, 'm3_http_requests_in_flight') === 6);
  const messages = sse('/v1/messages', {messages: [{role: 'user', content: 'term'}], max_tokens: 300, ignore_eos: true});
  const quiet = net.connect(Number(port), hostname, () => quiet.write(request('/v1/completions', JSON.stringify({...body, stream: true}))));
  quiet.pause();
  quiet.on('error', () => {});
  const plain = post(`${base}/v1/completions`, body);
  await waitFor('nine in flight', async () => await metric(base, 'm3_http_requests_in_flight') === 9);
  process.kill(Number(pid), 'SIGTERM');
  let aborted = 0;
  for (const ev of await Promise.all(streams)) {
    assert.equal(ev.at(-1), '[DONE]');
    const finish = ev.at(-2).choices[0].finish_reason;
    assert.ok(finish === 'abort' || finish === 'length', `finish ${finish}`);
    aborted += finish === 'abort';
  }
  assert.ok(aborted >= 5, `${aborted} streams cut short`);
  // Anthropic has no stop_reason for a cut-short turn: an error event ends the stream.
  const m = await messages;
  assert.equal(m.at(-1).type, 'error', JSON.stringify(m.at(-1)));
  assert.equal(m.at(-1).error.type, 'overloaded_error');
  assert.ok(!m.some((e) => e.type === 'message_stop'));
  const p = await plain;
  assert.equal(p.status, 503);
  assert.equal(p.body.error.type, 'server_error');
  await waitFor('the process to exit', async () => {
    try {
      return readFileSync(`/proc/${pid}/stat`, 'utf8').split(' ')[2] === 'Z';
    } catch {
      return true;
    }
  }, 20000);
  quiet.destroy();
});

done('faults');
