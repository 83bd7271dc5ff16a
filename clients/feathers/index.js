'use strict'
/**
 * feathers-pillion: every Feathers service of every app usable from every other app
 * as a local one, with its events, through the apps' pillion sidecars, as
 * feathers-distributed does with cote:
 *
 *   const pillion = require('feathers-pillion')
 *   app.configure(pillion())
 *
 * - Each local service is registered with the sidecar (service
 *   `feathers.<key>.<path>`, a node at a small HTTP server of this plugin), served to
 *   remote callers, and deregistered when the app tears down (`app.teardown()`, or
 *   `app.get('pillion').close()`).
 * - Each remote service appears as `app.service(path)`, with find, get, create,
 *   update, patch and remove. Calls go through the sidecar's `/rpc` as JSON, so
 *   arguments keep their types (numbers, booleans, null, `$in`, `$or`, ...); a remote
 *   error arrives as the same Feathers error class, with its data; a call to a
 *   service whose app is restarting waits for it (`X-Pillion-Wait`).
 * - Service events (created, updated, patched, removed, and the service's custom
 *   `events`) are published to the sidecar's broker (`events.<service>.<event>`),
 *   in the order each app emitted them, and re-emitted by the proxies of every
 *   other app.
 * - Distributed authentication: a call's `params.authentication.accessToken` travels
 *   as `Authorization: Bearer` (the sidecar's own token goes in
 *   `Pillion-Api-Token`), and the serving app runs its own hooks with it. Gateway
 *   mode: `hooks` (e.g. `{ before: { all: [authenticate('jwt')] } }`) apply to the
 *   remote services of this app, and `params.user` travels with the call.
 */
const http = require('node:http')
const errors = require('@feathersjs/errors')
const { getServiceOptions } = require('@feathersjs/feathers')

const METHODS = ['find', 'get', 'create', 'update', 'patch', 'remove']
const EVENTS = ['created', 'updated', 'patched', 'removed']
/** Marks the proxies this plugin made, so they are never published again. */
const PROXY = Symbol('feathers-pillion proxy')

/** `services`/`remoteServices`: a list of paths or a function of the path. */
function selector (option) {
  if (option === undefined) return () => true
  if (typeof option === 'function') return option
  if (Array.isArray(option)) return (path) => option.includes(path)
  throw new TypeError('feathers-pillion: services and remoteServices take a list of paths or a function')
}

function serviceName (key, path) {
  return `feathers.${key}.${path.replace(/\//g, '~')}`
}

function pathOf (key, name) {
  const prefix = `feathers.${key}.`
  return name.startsWith(prefix) ? name.slice(prefix.length).replace(/~/g, '/') : null
}

function pillion (options = {}) {
  const config = {
    sidecar: (options.sidecar || process.env.PILLION_SIDECAR || 'http://127.0.0.1:8081').replace(/\/+$/, ''),
    token: options.token || process.env.PILLION_API_TOKEN,
    key: options.key || 'default',
    host: options.host || '127.0.0.1',
    port: options.port || 0,
    // How often the registry is read for apps that came or went.
    discoveryInterval: options.discoveryInterval || 1000,
    // How long a call waits for a service whose app is (re)starting.
    wait: options.wait || '10s',
    timeout: options.timeout || '15s',
    ttl: options.ttl || '30s',
    local: selector(options.services),
    remote: selector(options.remoteServices),
    hooks: options.hooks
  }

  return function (app) {
    const state = {
      nodeId: `${process.pid}-${Math.random().toString(36).slice(2, 10)}`,
      local: new Map(), // path -> { events }
      remote: new Map(), // path -> { name, stop }
      queues: new Map(), // path -> the promise of its last event publication
      closed: false,
      discovering: false,
      timers: []
    }

    const headers = (extra = {}) => {
      const h = { 'content-type': 'application/json', ...extra }
      if (config.token) h['pillion-api-token'] = config.token
      return h
    }

    const sidecar = async (method, path, body, extra) => {
      const res = await fetch(`${config.sidecar}${path}`, {
        method,
        headers: headers(extra),
        body: body === undefined ? undefined : JSON.stringify(body)
      })
      const text = await res.text()
      let json
      try {
        json = text ? JSON.parse(text) : null
      } catch (e) {
        json = { message: text }
      }
      return { status: res.status, json }
    }

    // Remote callers reach local services here, through their sidecars.
    const server = http.createServer((req, res) => serve(req, res))
    const listening = new Promise((resolve) => server.listen(config.port, config.host, resolve))

    async function serve (req, res) {
      const reply = (status, body) => {
        res.writeHead(status, { 'content-type': 'application/json' })
        res.end(JSON.stringify(body === undefined ? null : body))
      }
      if (req.method === 'GET') return reply(200, { status: 'ok' }) // the health path
      let body = ''
      for await (const chunk of req) body += chunk
      let call
      try {
        call = JSON.parse(body)
      } catch (e) {
        return reply(400, new errors.BadRequest(`feathers-pillion: the call is not JSON: ${e.message}`).toJSON())
      }
      const { path, method, id, data } = call
      const service = state.local.has(path) && app.service(path)
      if (!service || !METHODS.includes(method) || typeof service[method] !== 'function') {
        return reply(404, new errors.NotFound(`no service ${path} with method ${method} here`).toJSON())
      }
      const params = { ...(call.params || {}), provider: 'pillion' }
      const auth = req.headers.authorization
      if (auth && /^bearer /i.test(auth)) {
        params.authentication = { strategy: 'jwt', accessToken: auth.slice(7).trim() }
        params.headers = { authorization: auth }
      }
      try {
        const args = method === 'find'
          ? [params]
          : ['get', 'remove'].includes(method)
              ? [id, params]
              : method === 'create' ? [data, params] : [id, data, params]
        reply(200, await service[method](...args))
      } catch (error) {
        const e = error && typeof error.toJSON === 'function' ? error : new errors.GeneralError(error && error.message, { cause: String(error) })
        reply(e.code >= 400 && e.code < 600 ? e.code : 500, e.toJSON())
      }
    }

    async function register (path, events, method = 'POST') {
      await listening
      const address = server.address()
      const name = serviceName(config.key, path)
      const node = {
        id: `${name}-${state.nodeId}`,
        address: config.host,
        port: address.port,
        metadata: { protocol: 'http1', feathers: 'v5', path }
      }
      const body = { name, metadata: { feathers: 'v5', path, events: events.join(',') }, nodes: [node] }
      const query = method === 'POST' ? `?ttl=${config.ttl}` : ''
      const { status, json } = await sidecar(method, `/registry${query}`, body)
      if (status !== 200 && !(method === 'DELETE' && status === 404)) {
        throw new Error(`feathers-pillion: ${method} /registry for ${path}: ${status} ${json && (json.message || json.detail)}`)
      }
    }

    function publish (path, event, data) {
      const topic = `events.${serviceName(config.key, path)}.${event}`
      // One after another per service: subscribers see each app's order.
      const last = state.queues.get(path) || Promise.resolve()
      const next = last.then(() => sidecar('POST', `/broker?topic=${encodeURIComponent(topic)}`, data === undefined ? null : data))
        .then(({ status, json }) => {
          if (status !== 200) console.error(`feathers-pillion: publishing ${topic}: ${status} ${json && json.message}`)
        })
        .catch((e) => console.error(`feathers-pillion: publishing ${topic}: ${e.message}`))
      state.queues.set(path, next)
    }

    function addLocal (service, path, options) {
      if (service[PROXY] || state.local.has(path) || !config.local(path, service)) return
      const custom = (options || getServiceOptions(service) || {}).events || []
      const events = [...EVENTS, ...custom.filter((e) => !EVENTS.includes(e))]
      state.local.set(path, { events })
      for (const event of events) {
        service.on(event, (data) => publish(path, event, data))
      }
      register(path, events.slice(EVENTS.length)).catch((e) => console.error(e.message))
    }

    /** A remote service, called through the sidecar. */
    function proxy (path, name) {
      const call = async (method, id, data, params = {}) => {
        const extra = { 'x-pillion-wait': config.wait, 'x-pillion-timeout': config.timeout }
        const token = params.authentication && params.authentication.accessToken
        if (token) extra.authorization = `Bearer ${token}`
        const request = {
          path,
          method,
          id,
          data,
          params: { query: params.query || {}, user: params.user, route: params.route }
        }
        const { status, json } = await sidecar('POST', '/rpc', { service: name, method: 'feathers', request }, extra)
        if (status >= 400) throw errors.convert({ name: 'GeneralError', message: `the call to ${path} failed with ${status}`, ...json })
        return json
      }
      return {
        [PROXY]: true,
        find: (params) => call('find', undefined, undefined, params),
        get: (id, params) => call('get', id, undefined, params),
        create: (data, params) => call('create', undefined, data, params),
        update: (id, data, params) => call('update', id, data, params),
        patch: (id, data, params) => call('patch', id, data, params),
        remove: (id, params) => call('remove', id, undefined, params)
      }
    }

    /** Re-emits the remote service's events on its proxy, until `stop`. */
    function follow (path, name) {
      const controller = new AbortController()
      const run = async () => {
        while (!controller.signal.aborted) {
          try {
            const res = await fetch(`${config.sidecar}/broker?topic=${encodeURIComponent(`events.${name}.*`)}`, {
              headers: { ...headers(), accept: 'text/event-stream' },
              signal: controller.signal
            })
            const decoder = new TextDecoder()
            let buffered = ''
            for await (const chunk of res.body) {
              buffered += decoder.decode(chunk, { stream: true })
              let end
              while ((end = buffered.indexOf('\n\n')) >= 0) {
                const block = buffered.slice(0, end)
                buffered = buffered.slice(end + 2)
                const line = block.split('\n').find((l) => l.startsWith('data:'))
                if (!line) continue
                const frame = JSON.parse(line.slice(5))
                const event = frame.Topic.slice(frame.Topic.lastIndexOf('.') + 1)
                const data = JSON.parse(Buffer.from(frame.Body, 'base64').toString() || 'null')
                const service = app.services[path]
                if (service && service[PROXY]) service.emit(event, data)
              }
            }
          } catch (e) {
            if (controller.signal.aborted) return
            console.error(`feathers-pillion: following ${name}'s events: ${e.message} ${e.cause && e.cause.message}`)
          }
          await new Promise((resolve) => setTimeout(resolve, 500))
        }
      }
      run()
      return () => controller.abort()
    }

    async function discover () {
      // One at a time: two overlapping runs would each add the same service.
      if (state.discovering) return
      state.discovering = true
      try {
        await discoverOnce()
      } finally {
        state.discovering = false
      }
    }

    async function discoverOnce () {
      const { status, json } = await sidecar('GET', '/registry')
      if (status !== 200 || !Array.isArray(json)) return
      const seen = new Set()
      for (const entry of json) {
        const path = pathOf(config.key, entry.name || '')
        // A path this app serves itself (shared or not) is never shadowed.
        const own = app.services[path] && !app.services[path][PROXY]
        if (path === null || own || !config.remote(path)) continue
        seen.add(path)
        if (state.remote.has(path)) continue
        const name = entry.name
        const found = await sidecar('GET', `/registry?service=${encodeURIComponent(name)}`)
        const meta = (Array.isArray(found.json) && found.json[0] && found.json[0].metadata) || {}
        const custom = (meta.events || '').split(',').filter(Boolean)
        // Every event, standard ones included, is the remote app's: listed as the
        // service's own, Feathers does not emit them again after a proxy's call
        // (as for its client services), and each arrives once, from the broker.
        // (`serviceEvents` says the same without Feathers' defaults twice, which would
        // publish each event twice to real-time clients.)
        const events = [...EVENTS, ...custom]
        app.use(path, proxy(path, name), { methods: METHODS, events, serviceEvents: events })
        if (config.hooks) app.service(path).hooks(config.hooks)
        state.remote.set(path, { name, stop: follow(path, name) })
      }
      for (const [path, remote] of state.remote) {
        if (!seen.has(path)) {
          remote.stop()
          state.remote.delete(path)
          await app.unuse(path)
        }
      }
    }

    async function close () {
      if (state.closed) return
      state.closed = true
      state.timers.forEach(clearInterval)
      for (const remote of state.remote.values()) remote.stop()
      await Promise.all([...state.local.entries()].map(([path, { events }]) =>
        register(path, events.slice(EVENTS.length), 'DELETE').catch(() => {})))
      await new Promise((resolve) => server.close(resolve))
    }

    // Services registered before and after this plugin.
    app.mixins.push(function (service, path, options) {
      // `this` is the app; the service is set up after the mixins run.
      setImmediate(() => addLocal(service, path, options))
    })
    for (const [path, service] of Object.entries(app.services)) addLocal(service, path)

    // Timers never keep the process alive on their own.
    state.timers.push(setInterval(() => {
      for (const [path, { events }] of state.local) {
        register(path, events.slice(EVENTS.length)).catch((e) => console.error(e.message))
      }
    }, 10000).unref())
    const discovering = () => discover().catch((e) => console.error(`feathers-pillion: ${e.message}`))
    state.timers.push(setInterval(discovering, config.discoveryInterval).unref())
    discovering()

    const teardown = app.teardown.bind(app)
    app.teardown = async (...args) => {
      await close()
      return teardown(...args)
    }
    app.set('pillion', { close, discover, ready: () => listening.then(discovering) })
  }
}

module.exports = pillion
module.exports.default = pillion
module.exports.pillion = pillion
