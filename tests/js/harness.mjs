// harness.mjs: the checks the server tests share; each script ends with done().
import assert from 'node:assert/strict';

let passed = 0, failed = 0;

export async function test(name, fn) {
  try {
    await fn();
    passed++;
  } catch (err) {
    failed++;
    console.log(`FAIL ${name}: ${err && err.stack ? err.stack : err}`);
  }
}

export function done(script) {
  console.log(`${script}: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

export { assert };

// POST JSON (or raw text) with fetch; returns {status, body (parsed JSON or text)}.
export async function post(url, body, headers = {}) {
  const r = await fetch(url, {method: 'POST', headers: {'content-type': 'application/json', ...headers},
                              body: typeof body === 'string' ? body : JSON.stringify(body)});
  const text = await r.text();
  let parsed = text;
  try { parsed = JSON.parse(text); } catch { /* not JSON */ }
  return {status: r.status, body: parsed};
}

// The Prometheus value of a metric line that starts with `name` (labels included).
export async function metric(base, name, headers = {}) {
  const text = await (await fetch(`${base}/metrics`, {headers})).text();
  const line = text.split('\n').find((l) => l.startsWith(name + ' '));
  assert.ok(line, `metric ${name} missing`);
  return Number(line.slice(name.length + 1));
}

export async function waitFor(what, fn, ms = 10000) {
  const until = Date.now() + ms;
  for (;;) {
    if (await fn()) return;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// The M3 tool-call block the model writes (spec §8.2).
const NS = ']<]minimax[>[';
export function toolBlock(calls) {
  let s = `${NS}<tool_call>\n`;
  for (const [name, args] of calls) {
    s += `${NS}<invoke name="${name}">`;
    for (const [k, v] of Object.entries(args)) s += `${NS}<${k}>${v}${NS}</${k}>`;
    s += `${NS}</invoke>\n`;
  }
  return s + `${NS}</tool_call>`;
}
export const EOT = '[e~[';
