// load.mjs URL PID: 256 concurrent streaming clients, three rounds. Each client forces its own
// text, so a lost, duplicated or crossed chunk shows up as a wrong text; after each round no KV
// page is held, and the server's resident memory stays flat from round 1 to round 3.
import {readFileSync} from 'node:fs';
import OpenAI from 'openai';
import {assert, done, EOT, metric, test, waitFor} from './harness.mjs';

const [base, pid] = process.argv.slice(2);
const openai = new OpenAI({baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 120000});
// ThreadSanitizer slows the server ~20x: there (scripts/test.sh --tsan) fewer clients still race.
const CLIENTS = process.env.TSAN_OPTIONS ? 32 : 256;

function rssKiB() {
  return Number(readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+)/)[1]);
}

async function client(round, i) {
  const text = `client ${i} of round ${round} says ${'ab'.repeat(i % 7)} done`;
  // Completions with a short prompt: the load is on streaming, not on prefilling 256 chat prompts.
  const stream = await openai.completions.create({
    model: 'm3-builtin', prompt: `hello ${i}`, stream: true, stream_options: {include_usage: true},
    m3_test_forced_text: text + EOT});
  let got = '', finishes = 0, usage = null, id = null;
  for await (const chunk of stream) {
    id ??= chunk.id;
    assert.equal(chunk.id, id, 'chunks of one stream share its id');
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      got += c.text;
      if (c.finish_reason) finishes++;
    }
  }
  assert.equal(got, text);
  assert.equal(finishes, 1);
  assert.ok(usage && usage.completion_tokens >= 1);
  return id;
}

const rss = [];
for (let round = 1; round <= 3; round++) {
  await test(`round ${round}: ${CLIENTS} concurrent streams complete exactly`, async () => {
    const t0 = Date.now();
    const ids = await Promise.all(Array.from({length: CLIENTS}, (_, i) => client(round, i)));
    assert.equal(new Set(ids).size, CLIENTS, 'every request got its own id');
    await waitFor('in-flight requests to drain', async () => await metric(base, 'm3_http_requests_in_flight') === 0);
    // The engine frees a sequence's pages right after its last chunk is handed over and publishes
    // its counters at the end of that step, so a response can complete before the count is 0:
    // wait for it (a page never freed times out here).
    await waitFor('no KV page held after the round', async () => await metric(base, 'm3_kv_pages_used') === 0);
    rss.push(rssKiB());
    console.log(`round ${round}: ${CLIENTS} streams in ${Date.now() - t0} ms, server RSS ${rss.at(-1)} KiB`);
  });
}

// Under ASan every finished connection thread leaves allocator state behind (~100 KiB each), so
// resident memory says nothing there; LeakSanitizer at the server's exit checks for leaks instead
// (ThreadSanitizer's shadow memory likewise).
if (!process.env.ASAN_OPTIONS && !process.env.TSAN_OPTIONS) await test('memory flat from round 1 to round 3', async () => {
  const growth = rss[2] - rss[0];
  assert.ok(growth < Math.max(16384, rss[0] * 0.1), `RSS grew ${growth} KiB (${rss.join(' -> ')})`);
});

done('load');
