// remote_media.mjs URL: http image URLs against `m3 serve --allow-remote-media
// --remote-media-timeout-ms 2500 --max-body 65536` (tests/cli_serve_remote_media.sh). A loopback
// image server here serves a committed fixture, a redirect chain, a redirect to file:, a 404, a
// stalled body, bodies over the byte cap (declared and endless), a non-image and downloads held
// until the test lets them go. The reference for a fetched image is the same file sent inline:
// greedy output and logprobs must be identical. (Without the flag: test_server_remote_media.c.)
import http from 'node:http';
import {readFileSync} from 'node:fs';
import {assert, done, post, test, waitFor} from './harness.mjs';

const base = process.argv[2];
const model = (await (await fetch(`${base}/v1/models`)).json()).data[0].id;
const TIMEOUT_MS = 2500, MAX_BYTES = 65536; // the server flags cli_serve_remote_media.sh passes
const png = readFileSync(new URL('../fixtures/vision/media/pattern.png', import.meta.url));

const hits = {};           // path -> requests seen
const held = [];           // responses of /hold, waiting for release()
let holding = 0, maxHolding = 0;
let endlessClosed = false; // the client gave up on /endless
const images = http.createServer((req, res) => {
  const path = req.url;
  hits[path] = (hits[path] ?? 0) + 1;
  const hops = /^\/hops\/(\d+)$/.exec(path);
  if (path === '/pattern.png' || (hops && hops[1] === '0')) {
    res.writeHead(200, {'content-type': 'image/png'}).end(png);
  } else if (hops) {
    res.writeHead(302, {location: `/hops/${Number(hops[1]) - 1}`}).end();
  } else if (path === '/to-file') {
    res.writeHead(302, {location: 'file:///etc/hostname'}).end();
  } else if (path === '/text') {
    res.writeHead(200, {'content-type': 'image/png'}).end('<html>not a picture</html>');
  } else if (path === '/stall') {
    res.writeHead(200, {'content-type': 'image/png', 'content-length': png.length});
    res.write(png.subarray(0, 100)); // and never the rest
  } else if (path === '/big') {
    res.writeHead(200, {'content-type': 'image/png'}).end(Buffer.alloc(MAX_BYTES + 1));
  } else if (path === '/almost') {
    res.writeHead(200, {'content-type': 'image/png'}).end(Buffer.alloc(MAX_BYTES - 100));
  } else if (path === '/endless') {
    // Chunked, no length: only counting the bytes as they come can stop it.
    res.writeHead(200, {'content-type': 'image/png'});
    res.on('close', () => { endlessClosed = true; });
    const more = () => { while (!res.destroyed && res.write(Buffer.alloc(16384))); };
    res.on('drain', more);
    more();
  } else if (path.startsWith('/hold')) {
    holding++;
    maxHolding = Math.max(maxHolding, holding);
    held.push(() => { holding--; res.writeHead(200, {'content-type': 'image/png'}).end(png); });
  } else {
    res.writeHead(404, {'content-type': 'text/html'}).end('<html>no such picture</html>');
  }
});
await new Promise((resolve) => images.listen(0, '127.0.0.1', resolve));
const img = `http://127.0.0.1:${images.address().port}`;
const releaseAll = () => { while (held.length) held.shift()(); };

const chat = (url, extra = {}) => post(`${base}/v1/chat/completions`, {model, temperature: 0,
  max_tokens: 4, logprobs: true, messages: [{role: 'user', content: [
    {type: 'text', text: 'describe'}, {type: 'image_url', image_url: {url}}]}], ...extra});
const messages = (source) => post(`${base}/v1/messages`, {model, temperature: 0, max_tokens: 4,
  messages: [{role: 'user', content: [{type: 'text', text: 'describe'}, {type: 'image', source}]}]});
// What must not depend on where the image came from.
const chatOutput = (r) => {
  assert.equal(r.status, 200, JSON.stringify(r.body));
  const c = r.body.choices[0];
  return JSON.stringify([r.body.usage.prompt_tokens, c.message.content, c.message.reasoning_content,
                         c.logprobs.content.map((t) => [t.token, t.logprob])]);
};
const inline = `data:image/png;base64,${png.toString('base64')}`;
const references = {}; // max_tokens -> chatOutput of the inline image
const reference = async (max_tokens = 4) =>
  (references[max_tokens] ??= chatOutput(await chat(inline, {max_tokens})));
const shown = (url) => url.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
// A 400 on content part 1 that names the URL and the cause.
async function refused(url, cause) {
  const r = await chat(url);
  assert.equal(r.status, 400, JSON.stringify(r.body));
  assert.equal(r.body.error.param, 'messages[0].content[1]');
  assert.match(r.body.error.message, new RegExp(`^messages\\[0\\]\\.content\\[1\\]: .*${shown(url)}`));
  assert.match(r.body.error.message, cause);
}

await test('a fetched image generates exactly what the same image sent inline does', async () => {
  const r = await chat(`${img}/pattern.png`);
  assert.equal(chatOutput(r), await reference());
  assert.ok(r.body.usage.completion_tokens > 0);
  assert.equal(hits['/pattern.png'], 1);
});

await test('anthropic url sources are fetched too', async () => {
  const out = (r) => {
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return JSON.stringify([r.body.usage, r.body.content]);
  };
  const expected = out(await messages({type: 'base64', media_type: 'image/png', data: png.toString('base64')}));
  assert.equal(out(await messages({type: 'url', url: `${img}/pattern.png`})), expected);
  const bad = await messages({type: 'url', url: `${img}/missing.png`});
  assert.equal(bad.status, 400);
  assert.equal(bad.body.error.type, 'invalid_request_error');
  assert.match(bad.body.error.message, /HTTP status 404/);
});

await test('up to 3 redirects are followed, a 4th is refused', async () => {
  assert.equal(chatOutput(await chat(`${img}/hops/3`)), await reference());
  await refused(`${img}/hops/4`, /more than 3 redirects/);
  assert.equal(hits['/hops/0'], 1, 'the refused chain was not cut at its 4th redirect');
});

await test('a redirect may lead only to http or https', async () => {
  await refused(`${img}/to-file`, /only http and https/);
});

await test('a non-2xx status is refused with the status', async () => {
  await refused(`${img}/missing.png`, /HTTP status 404/);
  const long = `${img}/${'x'.repeat(300)}`;
  const r = await chat(long);
  assert.equal(r.status, 400);
  assert.ok(r.body.error.message.includes(`${long.slice(0, 120)}...`));
  assert.ok(!r.body.error.message.includes(long.slice(0, 130)), 'the URL was not shortened');
});

await test('a body that stalls is cut off at the timeout', async () => {
  await refused(`${img}/stall`, new RegExp(`timed out after ${TIMEOUT_MS} ms`));
});

await test('bodies over the byte cap are refused, endless ones stopped at the cap; a request has one cap', async () => {
  await refused(`${img}/big`, new RegExp(`larger than the ${MAX_BYTES} bytes left`));
  // Were the endless body buffered on, the download would end by the timeout instead.
  await refused(`${img}/endless`, new RegExp(`larger than the ${MAX_BYTES} bytes left`));
  await waitFor('the fetcher to hang up on /endless', () => endlessClosed);
  // The images of one request share the cap: after the inline one, less is left for the URL.
  const r = await post(`${base}/v1/chat/completions`, {model, max_tokens: 1, messages: [{role: 'user',
    content: [{type: 'image_url', image_url: {url: inline}}, {type: 'image_url', image_url: {url: `${img}/almost`}}]}]});
  assert.equal(r.status, 400);
  assert.equal(r.body.error.param, 'messages[0].content[1]');
  assert.match(r.body.error.message, new RegExp(`larger than the ${MAX_BYTES - png.length} bytes left`));
});

await test('bytes that are not an image are refused', async () => {
  await refused(`${img}/text`, /fetched from .*: undecodable image data: .*not a JPEG, PNG, WebP or GIF image/);
});

await test('a download in progress does not hold up other requests', async () => {
  const pending = chat(`${img}/hold`);
  await waitFor('the download to begin', () => holding === 1);
  const other = await post(`${base}/v1/chat/completions`, {model, max_tokens: 4,
    messages: [{role: 'user', content: 'hi'}]});
  assert.equal(other.status, 200);
  assert.equal(holding, 1, 'the held download ended before the text request did');
  releaseAll();
  assert.equal(chatOutput(await pending), await reference());
});

await test('at most 4 downloads run at once; the others wait for a slot', async () => {
  maxHolding = 0;
  const short = {max_tokens: 1}; // the point is the downloads, not the generation
  const pending = [...Array(6).keys()].map((i) => chat(`${img}/hold/${i}`, short));
  await waitFor('4 downloads to begin', () => holding === 4);
  await new Promise((r) => setTimeout(r, 300)); // room for a 5th to show up if nothing stops it
  const early = maxHolding;
  const release = setInterval(releaseAll, 20);
  const results = await Promise.all(pending);
  clearInterval(release);
  assert.equal(early, 4);
  assert.equal(maxHolding, 4);
  for (const r of results) assert.equal(chatOutput(r), await reference(1));
});

images.closeAllConnections();
images.close();
done('remote_media');
