// api.mjs URL: the official OpenAI and Anthropic SDKs against `m3 serve --test-hooks` (built-in
// tiny model). Forced completions (m3_test_forced_text) make the model write thinking and tool
// calls, so the parsers and every response shape run on real engine output.
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import {readFileSync} from 'node:fs';
import {assert, done, EOT, metric, post, test, toolBlock} from './harness.mjs';

const base = process.argv[2];
const openai = new OpenAI({baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0});
const anthropic = new Anthropic({baseURL: base, apiKey: 'unused', maxRetries: 0});
const user = [{role: 'user', content: 'What is 2+2?'}];
const tools = [{type: 'function', function: {name: 'get_weather', description: 'Weather for a city',
  parameters: {type: 'object', properties: {location: {type: 'string'}, days: {type: 'integer'}},
               required: ['location']}}}];
const model = (await openai.models.list()).data[0].id;

// Joins a streamed chat completion per choice: content, reasoning, tool calls, finish, usage.
async function collectChat(stream) {
  const choices = [];
  let usage = null, chunks = 0;
  for await (const chunk of stream) {
    chunks++;
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      const acc = (choices[c.index] ??= {content: '', reasoning: '', calls: [], finish: null, logprobs: 0});
      acc.content += c.delta.content ?? '';
      acc.reasoning += c.delta.reasoning_content ?? '';
      for (const t of c.delta.tool_calls ?? []) {
        const call = (acc.calls[t.index] ??= {id: '', name: '', arguments: ''});
        call.id += t.id ?? '';
        call.name += t.function?.name ?? '';
        call.arguments += t.function?.arguments ?? '';
      }
      acc.logprobs += c.logprobs?.content?.length ?? 0;
      if (c.finish_reason) {
        assert.equal(acc.finish, null, 'one finish per choice');
        acc.finish = c.finish_reason;
      }
    }
  }
  return {choices, usage, chunks};
}

async function chatBoth(params) {
  const plain = await openai.chat.completions.create({model, ...params});
  const streamed = await collectChat(await openai.chat.completions.create(
      {model, ...params, stream: true, stream_options: {include_usage: true}}));
  return {plain, streamed};
}

async function tokenCount(body) {
  const r = await post(`${base}/tokenize`, body);
  assert.equal(r.status, 200);
  assert.equal(r.body.count, r.body.tokens.length);
  return r.body.count;
}

await test('models list names the served model', async () => {
  assert.equal(model, 'm3-builtin');
});

await test('chat: streamed equals non-streamed for a seed; usage counts', async () => {
  const {plain, streamed} = await chatBoth({messages: user, max_tokens: 12, seed: 7, temperature: 0.9, top_p: 0.95});
  const c = plain.choices[0];
  assert.equal(streamed.choices[0].content, c.message.content);
  assert.equal(streamed.choices[0].reasoning, c.message.reasoning_content ?? '');
  assert.equal(streamed.choices[0].finish, c.finish_reason);
  assert.equal(plain.usage.prompt_tokens, await tokenCount({messages: user}));
  assert.ok(plain.usage.completion_tokens >= 1 && plain.usage.completion_tokens <= 12);
  if (c.finish_reason === 'length') assert.equal(plain.usage.completion_tokens, 12);
  assert.equal(plain.usage.total_tokens, plain.usage.prompt_tokens + plain.usage.completion_tokens);
  // The second request of the same prompt is served from the prefix cache (on by default).
  const {prompt_tokens_details: cached, ...counts} = streamed.usage;
  assert.ok(cached.cached_tokens > 0 && cached.cached_tokens < counts.prompt_tokens);
  assert.deepEqual(counts, {prompt_tokens: plain.usage.prompt_tokens, completion_tokens: plain.usage.completion_tokens,
                            total_tokens: plain.usage.total_tokens});
});

await test('chat: n samples, each streamed equal to its non-streamed twin', async () => {
  const {plain, streamed} = await chatBoth({messages: user, max_tokens: 6, seed: 3, n: 3, ignore_eos: true});
  assert.equal(plain.choices.length, 3);
  for (const c of plain.choices) assert.equal(streamed.choices[c.index].content, c.message.content);
  assert.equal(plain.usage.completion_tokens, 18);
  assert.equal(streamed.usage.completion_tokens, 18);
});

await test('chat: forced text, stop string cut, finish stop, exact usage', async () => {
  const forced = `hello world STOP more${EOT}`;
  const {plain, streamed} = await chatBoth({messages: user, m3_test_forced_text: forced, stop: ['STOP'],
                                            chat_template_kwargs: {thinking_mode: 'disabled'}});
  assert.equal(plain.choices[0].message.content, 'hello world ');
  assert.equal(plain.choices[0].finish_reason, 'stop');
  assert.equal(streamed.choices[0].content, 'hello world ');
  const full = await tokenCount({prompt: forced});
  assert.ok(plain.usage.completion_tokens <= full && plain.usage.completion_tokens >= 3);
});

await test('chat: logprobs with top_logprobs, one entry per token', async () => {
  const {plain, streamed} = await chatBoth({messages: user, max_tokens: 5, seed: 1, logprobs: true,
                                            top_logprobs: 3, ignore_eos: true});
  const lp = plain.choices[0].logprobs.content;
  assert.equal(lp.length, plain.usage.completion_tokens);
  for (const t of lp) {
    assert.ok(t.logprob <= 0 && typeof t.token === 'string');
    assert.equal(t.top_logprobs.length, 3);
    assert.ok(t.top_logprobs[0].logprob >= t.top_logprobs[2].logprob);
  }
  assert.equal(streamed.choices[0].logprobs, lp.length);
});

await test('chat: thinking parsed into reasoning_content (adaptive and enabled)', async () => {
  const a = await chatBoth({messages: user, m3_test_forced_text: `<mm:think>let me add</mm:think>It is 4.${EOT}`});
  assert.equal(a.plain.choices[0].message.reasoning_content, 'let me add');
  assert.equal(a.plain.choices[0].message.content, 'It is 4.');
  assert.equal(a.streamed.choices[0].reasoning, 'let me add');
  assert.equal(a.streamed.choices[0].content, 'It is 4.');
  const e = await chatBoth({messages: user, chat_template_kwargs: {thinking_mode: 'enabled'},
                            m3_test_forced_text: `two plus two</mm:think>4${EOT}`});
  assert.equal(e.plain.choices[0].message.reasoning_content, 'two plus two');
  assert.equal(e.plain.choices[0].message.content, '4');
  assert.equal(e.streamed.choices[0].reasoning, 'two plus two');
  // The mode reaches the prompt (mode line and generation prompt differ).
  const on = await post(`${base}/tokenize`, {messages: user, chat_template_kwargs: {thinking_mode: 'enabled'}});
  const off = await post(`${base}/tokenize`, {messages: user, chat_template_kwargs: {thinking_mode: 'disabled'}});
  assert.notDeepEqual(on.body.tokens, off.body.tokens);
});

await test('chat: tool calls parsed, streamed as deltas, finish tool_calls', async () => {
  const forced = `Checking.${toolBlock([['get_weather', {location: 'Paris', days: 3}],
                                        ['get_weather', {location: 'Oslo'}]])}${EOT}`;
  const {plain, streamed} = await chatBoth({messages: user, tools, m3_test_forced_text: forced,
                                            chat_template_kwargs: {thinking_mode: 'disabled'}});
  const m = plain.choices[0].message;
  assert.equal(plain.choices[0].finish_reason, 'tool_calls');
  assert.equal(m.content, 'Checking.');
  assert.equal(m.tool_calls.length, 2);
  assert.equal(m.tool_calls[0].function.name, 'get_weather');
  assert.deepEqual(JSON.parse(m.tool_calls[0].function.arguments), {location: 'Paris', days: 3});
  assert.deepEqual(JSON.parse(m.tool_calls[1].function.arguments), {location: 'Oslo'});
  assert.notEqual(m.tool_calls[0].id, m.tool_calls[1].id);
  const s = streamed.choices[0];
  assert.equal(s.finish, 'tool_calls');
  assert.equal(s.content, 'Checking.');
  assert.deepEqual(s.calls.map((c) => [c.name, JSON.parse(c.arguments)]),
                   m.tool_calls.map((c) => [c.function.name, JSON.parse(c.function.arguments)]));
  assert.ok(s.calls[0].id.startsWith('call_') && s.calls[0].id !== s.calls[1].id);
});

await test('chat: tool_choice none leaves the block as text; named and required force a call', async () => {
  const block = toolBlock([['get_weather', {location: 'Rome'}]]);
  const none = await openai.chat.completions.create({model, messages: user, tools, tool_choice: 'none',
    m3_test_forced_text: `</mm:think>${block}${EOT}`});
  assert.equal(none.choices[0].message.tool_calls, undefined);
  assert.ok(none.choices[0].message.content.includes('<invoke name="get_weather">'));
  // Named: the prompt already opened the invoke, the model writes only the parameters.
  const rest = ']<]minimax[>[<location>Rome]<]minimax[>[</location>]<]minimax[>[</invoke>\n]<]minimax[>[</tool_call>' + EOT;
  const named = await chatBoth({messages: user, tools, m3_test_forced_text: rest,
                                tool_choice: {type: 'function', function: {name: 'get_weather'}}});
  assert.equal(named.plain.choices[0].message.tool_calls[0].function.name, 'get_weather');
  assert.deepEqual(JSON.parse(named.plain.choices[0].message.tool_calls[0].function.arguments), {location: 'Rome'});
  assert.equal(named.streamed.choices[0].calls[0].name, 'get_weather');
  const required = await openai.chat.completions.create({model, messages: user, tools, tool_choice: 'required',
    m3_test_forced_text: 'get_weather">' + rest});
  assert.equal(required.choices[0].finish_reason, 'tool_calls');
  assert.deepEqual(JSON.parse(required.choices[0].message.tool_calls[0].function.arguments), {location: 'Rome'});
  // The forced prefix is part of the prompt: named prompts are longer than auto ones.
  const auto = await tokenCount({messages: user, tools});
  const forced = await tokenCount({messages: user, tools, tool_choice: {type: 'function', function: {name: 'get_weather'}}});
  assert.ok(forced > auto);
});

await test('chat: a tool result round trip renders and runs', async () => {
  const messages = [...user, {role: 'assistant', content: null, tool_calls: [{id: 'call_1', type: 'function',
    function: {name: 'get_weather', arguments: '{"location":"Paris"}'}}]},
    {role: 'tool', tool_call_id: 'call_1', content: 'sunny'}];
  const r = await openai.chat.completions.create({model, messages, tools, max_tokens: 3});
  assert.equal(r.usage.prompt_tokens, await tokenCount({messages, tools}));
});

await test('completions: text and token-id prompts, stream equals plain, logprobs', async () => {
  const params = {model, prompt: 'Once upon a time', max_tokens: 8, seed: 11, temperature: 0.7, logprobs: 2, ignore_eos: true};
  const plain = await openai.completions.create(params);
  let text = '', finish = null, usage = null, lps = 0;
  for await (const ch of await openai.completions.create({...params, stream: true, stream_options: {include_usage: true}})) {
    if (ch.usage) usage = ch.usage;
    for (const c of ch.choices) {
      text += c.text;
      lps += c.logprobs?.tokens?.length ?? 0;
      finish = c.finish_reason ?? finish;
    }
  }
  assert.equal(text, plain.choices[0].text);
  assert.equal(finish, 'length');
  assert.equal(plain.usage.completion_tokens, 8);
  assert.equal(usage.completion_tokens, plain.usage.completion_tokens);
  assert.equal(usage.prompt_tokens, plain.usage.prompt_tokens);
  const lp = plain.choices[0].logprobs;
  assert.equal(lp.tokens.length, 8);
  assert.equal(lps, 8);
  assert.equal(lp.top_logprobs[0] && Object.keys(lp.top_logprobs[0]).length >= 1, true);
  const ids = (await post(`${base}/tokenize`, {prompt: 'Once upon a time'})).body.tokens;
  const byIds = await openai.completions.create({...params, prompt: ids});
  assert.equal(byIds.choices[0].text, plain.choices[0].text);
  assert.equal(byIds.usage.prompt_tokens, ids.length);
});

await test('tokenize/detokenize round trip', async () => {
  const t = await post(`${base}/tokenize`, {prompt: 'hello <mm:think> world'});
  const d = await post(`${base}/detokenize`, {tokens: t.body.tokens});
  assert.equal(d.body.prompt, 'hello <mm:think> world');
});

await test('openai errors: shape and status', async () => {
  const bad = await post(`${base}/v1/chat/completions`, '{"messages": [');
  assert.equal(bad.status, 400);
  assert.equal(bad.body.error.type, 'invalid_request_error');
  const cases = [
    [{messages: user, temperature: 'hot'}, 400, 'temperature'],
    [{messages: 'hi'}, 400, 'messages'],
    [{messages: user, model: 'gpt-4'}, 404, 'model'],
    [{messages: user, max_tokens: 1000000}, 400, 'max_tokens'],
    [{messages: user, n: 99}, 400, 'n'],
    [{messages: user, tool_choice: 'required'}, 400, 'tool_choice'],
  ];
  for (const [body, status, param] of cases) {
    const r = await post(`${base}/v1/chat/completions`, {model, ...body});
    assert.equal(r.status, status, JSON.stringify(body));
    assert.equal(r.body.error.param, param);
    assert.equal(typeof r.body.error.message, 'string');
  }
  await assert.rejects(openai.chat.completions.create({model: 'nope', messages: user}), (e) => e.status === 404 && e.code === 'model_not_found');
  const long = Array.from({length: 5000}, () => 100);
  await assert.rejects(openai.completions.create({model, prompt: long}), (e) => e.status === 400 && /context length/.test(e.message));
  const r = await post(`${base}/v1/nothing`, {});
  assert.equal(r.status, 404);
});

// ---- Anthropic ---------------------------------------------------------------------------

// Raw stream events, checked against Anthropic's order, folded into a message.
async function collectMessages(params) {
  const events = [];
  for await (const ev of await anthropic.messages.create({...params, stream: true})) events.push(ev);
  const types = events.map((e) => e.type);
  assert.equal(types[0], 'message_start');
  assert.deepEqual(types.slice(-2), ['message_delta', 'message_stop']);
  let open = -1;
  for (const e of events.slice(1, -2)) {
    if (e.type === 'content_block_start') { assert.equal(open, -1); open = e.index; }
    else if (e.type === 'content_block_delta') assert.equal(e.index, open);
    else if (e.type === 'content_block_stop') { assert.equal(e.index, open); open = -1; }
    else assert.fail(`unexpected ${e.type}`);
  }
  assert.equal(open, -1);
  return events;
}

const asystem = 'You are terse.';
const amsg = [{role: 'user', content: 'What is 2+2?'}];
const atools = [{name: 'get_weather', description: 'Weather for a city',
  input_schema: {type: 'object', properties: {location: {type: 'string'}, days: {type: 'integer'}}}}];

await test('anthropic: text message, usage, stream equals plain', async () => {
  const params = {model, system: asystem, messages: amsg, max_tokens: 10, seed: 5, temperature: 0.8};
  const m = await anthropic.messages.create(params);
  assert.equal(m.type, 'message');
  assert.equal(m.role, 'assistant');
  assert.ok(['end_turn', 'max_tokens'].includes(m.stop_reason));
  assert.equal(m.usage.input_tokens, await tokenCount({messages: [{role: 'system', content: asystem}, ...amsg]}));
  assert.ok(m.usage.output_tokens >= 1 && m.usage.output_tokens <= 10);
  const final = await anthropic.messages.stream(params).finalMessage();
  assert.deepEqual(final.content, m.content);
  assert.equal(final.stop_reason, m.stop_reason);
  assert.equal(final.usage.output_tokens, m.usage.output_tokens);
  await collectMessages(params);
});

await test('anthropic: thinking and tool_use blocks, stop reasons', async () => {
  const forced = `<mm:think>need weather</mm:think>Let me check.${toolBlock([['get_weather', {location: 'Paris', days: 2}]])}${EOT}`;
  const params = {model, messages: amsg, tools: atools, max_tokens: 200, m3_test_forced_text: forced};
  const m = await anthropic.messages.create(params);
  assert.deepEqual(m.content.map((b) => b.type), ['thinking', 'text', 'tool_use']);
  assert.equal(m.content[0].thinking, 'need weather');
  assert.equal(m.content[1].text, 'Let me check.');
  assert.equal(m.content[2].name, 'get_weather');
  assert.deepEqual(m.content[2].input, {location: 'Paris', days: 2});
  assert.equal(m.stop_reason, 'tool_use');
  const final = await anthropic.messages.stream(params).finalMessage();
  assert.deepEqual(final.content.map((b) => b.type), ['thinking', 'text', 'tool_use']);
  assert.deepEqual(final.content[2].input, {location: 'Paris', days: 2});
  assert.equal(final.content[0].thinking, 'need weather');
  assert.equal(final.stop_reason, 'tool_use');
  const events = await collectMessages(params);
  assert.ok(events.some((e) => e.delta?.type === 'input_json_delta'));
  assert.ok(events.some((e) => e.delta?.type === 'thinking_delta'));
});

await test('anthropic: stop_sequences, tool_result history, thinking disabled', async () => {
  const m = await anthropic.messages.create({model, messages: amsg, max_tokens: 50, stop_sequences: ['STOP'],
    thinking: {type: 'disabled'}, m3_test_forced_text: `abc STOP def${EOT}`});
  assert.equal(m.stop_reason, 'stop_sequence');
  assert.equal(m.stop_sequence, 'STOP');
  assert.equal(m.content[0].text, 'abc ');
  const history = [...amsg,
    {role: 'assistant', content: [{type: 'thinking', thinking: 'hm', signature: ''},
                                  {type: 'tool_use', id: 'toolu_1', name: 'get_weather', input: {location: 'Paris'}}]},
    {role: 'user', content: [{type: 'tool_result', tool_use_id: 'toolu_1', content: 'sunny'},
                             {type: 'text', text: 'and tomorrow?'}]}];
  const r = await anthropic.messages.create({model, messages: history, tools: atools, max_tokens: 3});
  const openaiForm = [{role: 'user', content: 'What is 2+2?'},
    {role: 'assistant', content: '', reasoning_content: 'hm', tool_calls: [{id: 'toolu_1', type: 'function',
      function: {name: 'get_weather', arguments: '{"location":"Paris"}'}}]},
    {role: 'tool', tool_call_id: 'toolu_1', content: 'sunny'}, {role: 'user', content: 'and tomorrow?'}];
  const otools = atools.map((t) => ({type: 'function', function: {name: t.name, description: t.description, parameters: t.input_schema}}));
  assert.equal(r.usage.input_tokens, await tokenCount({messages: openaiForm, tools: otools}));
});

await test('anthropic errors: shape and status', async () => {
  await assert.rejects(anthropic.messages.create({model, messages: amsg}),
                       (e) => e.status === 400 && e.error?.error?.type === 'invalid_request_error');
  await assert.rejects(anthropic.messages.create({model: 'claude-x', messages: amsg, max_tokens: 5}),
                       (e) => e.status === 404 && e.error?.error?.type === 'not_found_error');
  const bad = await post(`${base}/v1/messages`, '{');
  assert.equal(bad.status, 400);
  assert.equal(bad.body.type, 'error');
  assert.equal(bad.body.error.type, 'invalid_request_error');
  const role = await post(`${base}/v1/messages`, {model, max_tokens: 5, messages: [{role: 'robot', content: 'x'}]});
  assert.equal(role.status, 400);
});

// Images (smart_resize, factor 28, at least 3136 pixels): tiny_23x9.png -> 56x112 -> 4 x 8
// patches -> 8 merged tokens; pattern.png (40x30) -> 84x56 -> 6 tokens; plus the start and end
// markers, ids the text-only prompt does not have. The image
// follows the text so that the text tokenizes as it does alone (a special token splits merges).
const mediaDir = new URL('../fixtures/vision/media/', import.meta.url);
const b64 = (name) => readFileSync(new URL(name, mediaDir)).toString('base64');
const IMAGE_IDS = {'tiny_23x9.png': 10, 'pattern.png': 8};

await test('chat: image_url data: URLs count their placeholders; the pixels change the output', async () => {
  const textOnly = await tokenCount({messages: [{role: 'user', content: 'describe'}]});
  const run = async (name) => {
    const r = await openai.chat.completions.create({model, temperature: 0, max_tokens: 8, logprobs: true,
      messages: [{role: 'user', content: [
        {type: 'text', text: 'describe'},
        {type: 'image_url', image_url: {url: `data:image/png;base64,${b64(name)}`}}]}]});
    assert.equal(r.usage.prompt_tokens, textOnly + IMAGE_IDS[name]);
    const m = r.choices[0].message;
    return JSON.stringify([m.content, m.reasoning_content, r.choices[0].logprobs.content.map((t) => t.logprob)]);
  };
  const a = await run('tiny_23x9.png');
  assert.equal(await run('tiny_23x9.png'), a, 'greedy output of one image is repeatable');
  assert.notEqual(await run('pattern.png'), a, 'two different images gave the same output');
  const bad = await post(`${base}/v1/chat/completions`, {model, max_tokens: 2, messages: [{role: 'user', content: [
    {type: 'text', text: 'x'}, {type: 'image_url', image_url: {url: 'https://example.com/cat.png'}}]}]});
  assert.equal(bad.status, 400);
  assert.equal(bad.body.error.param, 'messages[0].content[1]');
  assert.match(bad.body.error.message, /remote/);
  const junk = await post(`${base}/v1/chat/completions`, {model, max_tokens: 2, messages: [{role: 'user', content: [
    {type: 'image_url', image_url: {url: 'data:image/png;base64,aGVsbG8='}}]}]});
  assert.equal(junk.status, 400);
  assert.equal(junk.body.error.param, 'messages[0].content[0]');
});

await test('anthropic: base64 image blocks count their placeholders; the pixels change the output', async () => {
  const textOnly = await tokenCount({messages: [{role: 'user', content: 'describe'}]});
  const run = async (name, type) => {
    const r = await anthropic.messages.create({model, max_tokens: 8, temperature: 0, messages: [{role: 'user', content: [
      {type: 'text', text: 'describe'},
      {type: 'image', source: {type: 'base64', media_type: type, data: b64(name)}}]}]});
    assert.equal(r.usage.input_tokens, textOnly + IMAGE_IDS[name]);
    return JSON.stringify(r.content);
  };
  assert.notEqual(await run('tiny_23x9.png', 'image/png'), await run('pattern.png', 'image/png'),
                  'two different images gave the same output');
  const bad = await post(`${base}/v1/messages`, {model, max_tokens: 2, messages: [{role: 'user', content: [
    {type: 'image', source: {type: 'base64', media_type: 'image/bmp', data: b64('pattern.png')}}]}]});
  assert.equal(bad.status, 400);
  assert.equal(bad.body.error.type, 'invalid_request_error');
  assert.match(bad.body.error.message, /messages\[0\]\.content\[0\]: media type 'image\/bmp'/);
});

await test('health and metrics', async () => {
  assert.equal((await fetch(`${base}/health`)).status, 200);
  assert.ok(await metric(base, 'm3_kv_pages_free') > 0);
  assert.ok(await metric(base, 'm3_generation_tokens_total') > 0);
  assert.ok(await metric(base, 'm3_time_to_first_token_seconds_count') > 0);
});

done('api');
