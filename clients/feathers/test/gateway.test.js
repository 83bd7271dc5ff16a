'use strict'
// Three apps behind three sidecars: `todos` on a koa app, `users` on an express app,
// and a gateway (express with socket.io) that serves both to its clients: a
// socket.io client of the gateway calls both services and gets the todos app's
// events in real time, through the gateway's channels.
const { test } = require('node:test')
const assert = require('node:assert/strict')

const { feathers } = require('@feathersjs/feathers')
const errors = require('@feathersjs/errors')
const { koa } = require('@feathersjs/koa')
const express = require('@feathersjs/express')
const socketio = require('@feathersjs/socketio')
const socketioClient = require('@feathersjs/socketio-client')
const io = require('socket.io-client')
const { MemoryService } = require('@feathersjs/memory')
const pillion = require('..')
const { freePort, sidecar, eventually } = require('./helpers')

test('a socket.io client of the gateway uses services of two other apps, events included', async () => {
  const one = await sidecar()
  const two = await sidecar(one.gossip)
  const three = await sidecar(one.gossip)

  const todosApp = koa(feathers())
  todosApp.use('todos', new MemoryService({ multi: true }))
  todosApp.configure(pillion({ sidecar: one.url }))
  await todosApp.setup()

  const usersApp = express.default(feathers())
  usersApp.use('users', new MemoryService({ store: { 1: { id: 1, name: 'alice' } } }))
  usersApp.configure(pillion({ sidecar: two.url }))
  await usersApp.setup()

  const gateway = express.default(feathers())
  gateway.configure(socketio())
  gateway.on('connection', (connection) => gateway.channel('everybody').join(connection))
  gateway.publish(() => gateway.channel('everybody'))
  gateway.configure(pillion({ sidecar: three.url }))
  const port = await freePort()
  const server = await gateway.listen(port)
  await eventually(() => gateway.services.todos && gateway.services.users, 15000, 'both services on the gateway')

  const socket = io(`http://127.0.0.1:${port}`, { transports: ['websocket'] })
  const client = feathers().configure(socketioClient(socket, { timeout: 10000 }))
  const todos = client.service('todos')
  const users = client.service('users')

  assert.equal((await users.get(1)).name, 'alice')
  await assert.rejects(users.get(2), (e) => e.name === 'NotFound' && e.code === 404)

  const created = []
  todos.on('created', (t) => created.push(t.text))
  await new Promise((resolve) => setTimeout(resolve, 500))
  await todos.create({ text: 'from the socket client', n: 1 })
  await todosApp.service('todos').create({ text: 'from the todos app', n: 2 })
  await eventually(() => created.length >= 2, 10000, 'created events on the socket client')
  assert.deepEqual(created, ['from the socket client', 'from the todos app'])
  assert.deepEqual((await todos.find({ query: { n: 2 } })).map((t) => t.text), ['from the todos app'])

  socket.close()
  await todosApp.teardown()
  await usersApp.teardown()
  await gateway.get('pillion').close()
  server.close()
  assert.ok(errors.NotFound)
})
