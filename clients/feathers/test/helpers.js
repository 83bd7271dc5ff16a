'use strict'
// Real sidecars for the suite: PILLION_BIN names the binary (tests/feathers.rs sets it).
const { after } = require('node:test')
const assert = require('node:assert/strict')
const { spawn } = require('node:child_process')
const net = require('node:net')
const dgram = require('node:dgram')

const BIN = process.env.PILLION_BIN
assert.ok(BIN, 'PILLION_BIN must name the pillion binary (cargo test runs this with it)')

/** A loopback port free for TCP and UDP now (gossip uses both). */
async function freePort () {
  for (;;) {
    const port = await new Promise((resolve) => {
      const s = net.createServer().listen(0, '127.0.0.1', () => {
        const { port } = s.address()
        s.close(() => resolve(port))
      })
    })
    const free = await new Promise((resolve) => {
      const u = dgram.createSocket('udp4')
      u.once('error', () => resolve(false))
      u.bind(port, '127.0.0.1', () => u.close(() => resolve(true)))
    })
    if (free) return port
  }
}

const children = []
after(() => children.forEach((c) => c.kill('SIGKILL')))

/** A sidecar on a free port; `join`: the gossip address of another. */
async function sidecar (join) {
  const [api, gossip] = [await freePort(), await freePort()]
  const args = ['run', '--address', `127.0.0.1:${api}`, '--cluster-bind', `127.0.0.1:${gossip}`]
  if (join) args.push('--cluster-join', join)
  const child = spawn(BIN, args, { stdio: ['ignore', 'inherit', 'inherit'] })
  children.push(child)
  const url = `http://127.0.0.1:${api}`
  await eventually(async () => (await fetch(`${url}/healthz`)).ok, 10000, `sidecar ${url}`)
  return { url, gossip: `127.0.0.1:${gossip}`, child }
}

async function eventually (probe, ms, what) {
  const deadline = Date.now() + ms
  for (;;) {
    try {
      if (await probe()) return
    } catch (e) {}
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`)
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
}

module.exports = { freePort, sidecar, eventually }
