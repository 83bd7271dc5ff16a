// The todos service of the pillion walkthrough: node's built-in modules only.
//
//   PORT=3002 SIDECAR=http://127.0.0.1:8082 node examples/todos/app.js
//
// GET  /health          200 {"status":"ok"}
// GET  /todos?user=ID   that user's todos
// GET  /todos/{id}      the todo with its owner, asked of the users service by name
//                       through this app's sidecar: $SIDECAR/invoke/users/users/{user}
// POST /todos           {"user":42,"title":"..."}: checks the owner with the users
//                       service, stores the todo and publishes it to the topic
//                       todo.created through the sidecar's broker: POST $SIDECAR/broker?topic=todo.created
'use strict';

const http = require('http');

const PORT = Number(process.env.PORT || 3002);
const SIDECAR = (process.env.SIDECAR || 'http://127.0.0.1:8082').replace(/\/$/, '');

const todos = [
  { id: 1, user: 1, title: 'write the first program', done: true },
  { id: 2, user: 1, title: 'describe the analytical engine', done: false },
  { id: 3, user: 2, title: 'break the enigma', done: true },
];

// One request to the sidecar: resolves to { status, body } (body parsed when JSON).
function sidecar(method, path, body) {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? null : Buffer.from(JSON.stringify(body));
    const req = http.request(
      SIDECAR + path,
      {
        method,
        timeout: 5000,
        headers: data ? { 'Content-Type': 'application/json', 'Content-Length': data.length } : {},
      },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString();
          let parsed = text;
          try {
            parsed = JSON.parse(text);
          } catch (_) {
            // not JSON: keep the text
          }
          resolve({ status: res.statusCode, body: parsed });
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${path}: timed out`)));
    req.on('error', reject);
    if (data) req.write(data);
    req.end();
  });
}

// The users service, by name.
async function owner(userId) {
  const res = await sidecar('GET', `/invoke/users/users/${encodeURIComponent(userId)}`);
  return res.status === 200 ? res.body : null;
}

function answer(res, status, body) {
  const data = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': data.length });
  res.end(data);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString()));
    req.on('error', reject);
  });
}

async function route(req, res) {
  const url = new URL(req.url, 'http://localhost');
  if (req.method === 'GET' && url.pathname === '/health') {
    return answer(res, 200, { status: 'ok' });
  }
  if (req.method === 'GET' && url.pathname === '/todos') {
    const user = Number(url.searchParams.get('user'));
    return answer(res, 200, todos.filter((t) => !url.searchParams.has('user') || t.user === user));
  }
  const one = url.pathname.match(/^\/todos\/(\d+)$/);
  if (req.method === 'GET' && one) {
    const todo = todos.find((t) => t.id === Number(one[1]));
    if (!todo) return answer(res, 404, { error: `no todo ${one[1]}` });
    return answer(res, 200, { ...todo, owner: await owner(todo.user) });
  }
  if (req.method === 'POST' && url.pathname === '/todos') {
    let input;
    try {
      input = JSON.parse(await readBody(req));
    } catch (_) {
      return answer(res, 400, { error: 'the body is not JSON' });
    }
    if (!input || typeof input.title !== 'string' || !Number.isInteger(input.user)) {
      return answer(res, 400, { error: 'give {"user": ID, "title": "..."}' });
    }
    const user = await owner(input.user);
    if (!user) return answer(res, 422, { error: `no user ${input.user} in the users service` });
    const todo = { id: todos.length + 1, user: user.id, title: input.title, done: false };
    todos.push(todo);
    const event = { ...todo, owner: user.name };
    const published = await sidecar('POST', '/broker?topic=todo.created', event);
    if (published.status !== 200) {
      return answer(res, 502, { error: 'publishing todo.created failed', broker: published.body });
    }
    return answer(res, 201, todo);
  }
  return answer(res, 404, { error: `no route ${req.method} ${url.pathname}` });
}

http
  .createServer((req, res) => {
    route(req, res).catch((err) => answer(res, 502, { error: String(err.message || err) }));
  })
  .listen(PORT, '127.0.0.1', () => {
    console.log(`todos listening on 127.0.0.1:${PORT}, sidecar ${SIDECAR}`);
  });
