'use strict'
// Authentication with distributed services, both of feathers-distributed's ways:
// - distributed: the serving app checks the caller's JWT itself (Feathers'
//   authentication, the secret all apps share); the token travels with the call;
// - gateway: the `hooks` option guards the remote services on the gateway only, and
//   `params.user` travels to the serving app, which has no authentication at all.
// And `key`: apps of another key do not see each other's services.
const { test } = require('node:test')
const assert = require('node:assert/strict')

const { feathers } = require('@feathersjs/feathers')
const errors = require('@feathersjs/errors')
const { AuthenticationService, JWTStrategy, authenticate } = require('@feathersjs/authentication')
const pillion = require('..')
const { sidecar, eventually } = require('./helpers')

const SECRET = 'the-secret-every-app-shares-0123456789'

/** A service that says who called it. */
const whoami = {
  async find (params) {
    return { user: params.user || null, authenticated: Boolean(params.authenticated) }
  }
}

function withAuthentication (app) {
  app.set('authentication', { secret: SECRET, entity: null, authStrategies: ['jwt'] })
  const auth = new AuthenticationService(app)
  auth.register('jwt', new JWTStrategy())
  app.use('authentication', auth)
  return auth
}

test('the caller\'s token travels and the serving app checks it (distributed)', async () => {
  const one = await sidecar()
  const two = await sidecar(one.gossip)

  const server = feathers()
  withAuthentication(server)
  server.use('whoami', whoami)
  server.service('whoami').hooks({ before: { find: [authenticate('jwt')] } })
  server.configure(pillion({ sidecar: one.url, services: ['whoami'] }))
  await server.setup()

  const client = feathers()
  const auth = withAuthentication(client)
  client.configure(pillion({ sidecar: two.url, wait: '300ms' }))
  await client.setup()
  await eventually(() => client.services.whoami !== undefined, 15000, 'whoami on the caller')

  const accessToken = await auth.createAccessToken({ sub: 'alice' })
  const seen = await client.service('whoami').find({ authentication: { strategy: 'jwt', accessToken } })
  assert.equal(seen.authenticated, true, JSON.stringify(seen))
  await assert.rejects(client.service('whoami').find({}), (e) => e instanceof errors.NotAuthenticated)
  const forged = await new AuthenticationService(feathers()).createAccessToken({ sub: 'eve' }, {}, 'another-secret-0123456789')
  await assert.rejects(
    client.service('whoami').find({ authentication: { strategy: 'jwt', accessToken: forged } }),
    (e) => e instanceof errors.NotAuthenticated)
  // Each app keeps its own authentication service: a remote one never shadows it.
  assert.equal(client.services.authentication.constructor, AuthenticationService)
  assert.equal(server.services.authentication.constructor, AuthenticationService)

  await server.teardown()
  await client.teardown()
})

test('the gateway\'s hooks guard remote services and params.user travels (gateway)', async () => {
  const one = await sidecar()
  const two = await sidecar(one.gossip)

  const backend = feathers()
  backend.use('whoami', whoami)
  backend.configure(pillion({ sidecar: one.url }))
  await backend.setup()

  const requireUser = (ctx) => {
    if (!ctx.params.user) throw new errors.NotAuthenticated('log in at the gateway')
  }
  const gateway = feathers()
  gateway.configure(pillion({ sidecar: two.url, hooks: { before: { all: [requireUser] } } }))
  await gateway.setup()
  const other = feathers()
  other.configure(pillion({ sidecar: two.url, key: 'another-team' }))
  await other.setup()
  await eventually(() => gateway.services.whoami !== undefined, 15000, 'whoami on the gateway')

  await assert.rejects(gateway.service('whoami').find({}), (e) =>
    e instanceof errors.NotAuthenticated && e.message === 'log in at the gateway')
  const seen = await gateway.service('whoami').find({ user: { id: 7, email: 'a@example.com' } })
  assert.deepEqual(seen.user, { id: 7, email: 'a@example.com' })
  // Another key: never sees the service.
  await new Promise((resolve) => setTimeout(resolve, 1500))
  assert.equal(other.services.whoami, undefined)

  await backend.teardown()
  await gateway.teardown()
  await other.teardown()
})
