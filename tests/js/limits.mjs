// limits.mjs URL PID: a server run with --api-key secret --max-body 4096 --max-concurrent 2:
// authentication, body and concurrency limits, a vanished client's request cancelled and its
// KV pages freed, and SIGTERM letting the request in flight finish (the shell checks exit 0).
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import {assert, done, metric, post, test, waitFor} from './harness.mjs';

const [base, pid] = process.argv.slice(2);
const key = {authorization: 'Bearer secret'};
const openai = new OpenAI({baseURL: `${base}/v1`, apiKey: 'secret', maxRetries: 0});
const user = [{role: 'user', content: 'hi'}];
const long = {model: 'm3-builtin', prompt: 'hi', max_tokens: 3000, ignore_eos: true, stream: true};

async function idle() {
  await waitFor('the server to go idle', async () =>
    await metric(base, 'm3_http_requests_in_flight', key) === 0 && await metric(base, 'm3_kv_pages_used', key) === 0);
}

await test('api key: Bearer and x-api-key accepted, others refused in each API shape', async () => {
  const none = await post(`${base}/v1/chat/completions`, {messages: user, max_tokens: 1});
  assert.equal(none.status, 401);
  assert.equal(none.body.error.type, 'authentication_error');
  const wrong = await post(`${base}/v1/messages`, {messages: user, max_tokens: 1}, {'x-api-key': 'secrez'});
  assert.equal(wrong.status, 401);
  assert.equal(wrong.body.error.type, 'authentication_error');
  assert.equal((await post(`${base}/v1/models`, {})).status, 405);
  assert.equal((await fetch(`${base}/v1/models`)).status, 401);
  assert.equal((await fetch(`${base}/health`)).status, 200);
  const r = await openai.chat.completions.create({model: 'm3-builtin', messages: user, max_tokens: 2});
  assert.ok(r.usage.completion_tokens >= 1);
  const anthropic = new Anthropic({baseURL: base, apiKey: 'secret', maxRetries: 0});
  const m = await anthropic.messages.create({model: 'm3-builtin', messages: user, max_tokens: 2});
  assert.ok(m.usage.output_tokens >= 1);
});

await test('body over --max-body gets 413', async () => {
  const r = await post(`${base}/v1/chat/completions`, {messages: [{role: 'user', content: 'x'.repeat(5000)}]}, key);
  assert.equal(r.status, 413);
  assert.equal(r.body.error.type, 'invalid_request_error');
  const a = await post(`${base}/v1/messages`, {messages: [{role: 'user', content: 'x'.repeat(5000)}]}, key);
  assert.equal(a.status, 413);
  assert.equal(a.body.error.type, 'request_too_large');
});

await test('a client that hangs up mid-stream cancels its request and frees its pages', async () => {
  const before = await metric(base, 'm3_requests_finished_total{reason="cancelled"}', key);
  const stream = await openai.completions.create(long);
  let chunks = 0;
  for await (const c of stream) {
    assert.equal(c.choices[0].finish_reason, null);
    if (++chunks === 1) await waitFor('the request to hold pages', async () => await metric(base, 'm3_kv_pages_used', key) > 0);
    if (chunks === 3) break; /* the SDK closes the connection */
  }
  await idle();
  assert.equal(await metric(base, 'm3_requests_finished_total{reason="cancelled"}', key), before + 1);
});

await test('a client that hangs up while waiting for a non-streamed answer cancels it', async () => {
  const before = await metric(base, 'm3_requests_finished_total{reason="cancelled"}', key);
  const ac = new AbortController();
  const pending = openai.completions.create({...long, stream: false}, {signal: ac.signal});
  await waitFor('the request to run', async () => await metric(base, 'm3_kv_pages_used', key) > 0);
  ac.abort();
  await assert.rejects(pending);
  await idle();
  assert.equal(await metric(base, 'm3_requests_finished_total{reason="cancelled"}', key), before + 1);
});

await test('requests over --max-concurrent get 429 in each API shape', async () => {
  const acs = [new AbortController(), new AbortController()];
  const streams = await Promise.all(acs.map((ac) => openai.completions.create(long, {signal: ac.signal})));
  const r = await post(`${base}/v1/completions`, {prompt: 'x', max_tokens: 1}, key);
  assert.equal(r.status, 429);
  assert.equal(r.body.error.type, 'rate_limit_error');
  const a = await post(`${base}/v1/messages`, {messages: user, max_tokens: 1}, key);
  assert.equal(a.status, 429);
  assert.equal(a.body.error.type, 'rate_limit_error');
  acs.forEach((ac) => ac.abort());
  for (const s of streams) {
    try {
      for await (const _ of s);
    } catch { /* aborted */ }
  }
  await idle();
});

await test('SIGTERM: the stream in flight finishes, then the server stops accepting', async () => {
  const stream = await openai.completions.create({...long, max_tokens: 40});
  let text = '', finish = null, signalled = false;
  for await (const c of stream) {
    if (!signalled) {
      process.kill(Number(pid), 'SIGTERM');
      signalled = true;
    }
    text += c.choices[0]?.text ?? '';
    finish = c.choices[0]?.finish_reason ?? finish;
  }
  assert.equal(finish, 'length');
  await waitFor('the listener to close', async () => {
    try {
      await fetch(`${base}/health`);
      return false;
    } catch {
      return true;
    }
  });
});

done('limits');
