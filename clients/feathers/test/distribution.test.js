'use strict'
// Real Feathers v5 apps (koa and express) across two real pillion sidecars joined in
// one cluster: a service of one app used from the other as if local, with JSON
// types, Feathers' error classes and events in order; an app that stops disappears.
// Needs PILLION_BIN, the pillion binary (the Rust test tests/feathers.rs sets it).
const { test } = require('node:test')
const assert = require('node:assert/strict')

const { feathers } = require('@feathersjs/feathers')
const errors = require('@feathersjs/errors')
const { koa, rest: koaRest, bodyParser } = require('@feathersjs/koa')
const express = require('@feathersjs/express')
const { MemoryService } = require('@feathersjs/memory')
const pillion = require('..')
const { freePort, sidecar, eventually } = require('./helpers')

test('a service of a koa app is used from an express app through two sidecars', async () => {
  const one = await sidecar()
  const two = await sidecar(one.gossip)

  // The koa app holds `todos`, with a custom event.
  const todos = koa(feathers())
  todos.use(bodyParser())
  todos.use(koaRest())
  todos.use('todos', new MemoryService({ multi: true }), {
    methods: ['find', 'get', 'create', 'update', 'patch', 'remove'],
    events: ['archived']
  })
  todos.configure(pillion({ sidecar: one.url }))
  await todos.setup()

  // The express app is the gateway: its REST clients reach `todos` through it.
  const gateway = express.default(feathers())
  gateway.use(express.json())
  gateway.configure(express.rest())
  gateway.configure(pillion({ sidecar: two.url, wait: '300ms' }))
  const port = await freePort()
  const server = await gateway.listen(port)

  await eventually(() => gateway.services.todos !== undefined, 15000, 'todos on the gateway')
  const remote = gateway.service('todos')

  // JSON types arrive as they were given.
  const milk = await remote.create({ text: 'milk', n: 2, done: false, tags: ['a', 'b'], note: null })
  assert.equal(typeof milk.id, 'number')
  await remote.create([{ text: 'eggs', n: 1, done: true }, { text: 'tea', n: 3, done: false }])
  const found = await remote.find({ query: { n: 2 } })
  assert.deepEqual(found.map((t) => t.text), ['milk'])
  const open = await remote.find({ query: { done: false, n: { $in: [2, 3] }, $sort: { n: -1 } } })
  assert.deepEqual(open.map((t) => t.text), ['tea', 'milk'])
  const either = await remote.find({ query: { $or: [{ text: 'eggs' }, { n: 2, tags: { $in: ['b'] } }] } })
  assert.deepEqual(either.map((t) => t.text).sort(), ['eggs', 'milk'])
  assert.deepEqual((await remote.get(milk.id)).tags, ['a', 'b'])
  assert.equal((await remote.patch(milk.id, { done: true })).done, true)
  assert.equal((await remote.update(milk.id, { text: 'oat milk', n: 2 })).text, 'oat milk')

  // Errors arrive as the same Feathers class, with their data.
  await assert.rejects(remote.get(999), (e) => e instanceof errors.NotFound && e.code === 404)
  todos.service('todos').hooks({
    before: { create: [(ctx) => { if (!ctx.data.text) throw new errors.BadRequest('text is required', { field: 'text' }) }] }
  })
  await assert.rejects(remote.create({ n: 9 }), (e) =>
    e instanceof errors.BadRequest && e.message === 'text is required' && e.data.field === 'text')

  // A REST client of the gateway.
  const rest = await fetch(`http://127.0.0.1:${port}/todos/${milk.id}`)
  assert.equal(rest.status, 200)
  assert.equal((await rest.json()).text, 'oat milk')

  // Events of the koa app reach the gateway's proxy, in the order emitted, custom
  // ones included.
  const seen = []
  remote.on('created', (t) => seen.push(`created ${t.text}`))
  remote.on('removed', (t) => seen.push(`removed ${t.text}`))
  remote.on('archived', (t) => seen.push(`archived ${t.text}`))
  await new Promise((resolve) => setTimeout(resolve, 500)) // the subscription opens
  const local = todos.service('todos')
  const made = []
  for (const text of ['one', 'two', 'three']) made.push(await local.create({ text, n: 0 }))
  await local.remove(made[0].id)
  local.emit('archived', { text: 'two' })
  const want = ['created one', 'created two', 'created three', 'removed one', 'archived two']
  await eventually(() => seen.length >= want.length, 10000, 'the events')
  assert.deepEqual(seen, want)

  // The koa app stops: pillion's own error is a Feathers class too, and the service
  // leaves the gateway.
  await todos.teardown()
  await assert.rejects(remote.find({}), (e) => e instanceof errors.Unavailable && e.code === 503)
  await eventually(() => gateway.services.todos === undefined, 15000, 'todos gone from the gateway')

  await gateway.get('pillion').close()
  server.close()
})
