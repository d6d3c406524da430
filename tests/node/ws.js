// Node's `ws` on both ends of the gate, for tests/node_clients.rs.
//
//   node ws.js server
//       A `ws` echo server on 127.0.0.1:0 that selects no subprotocol (as `ws` does
//       without handleProtocols). Prints {"port": N}; ends when stdin closes.
//   node ws.js client URL TOKEN
//       Opens `new WebSocket(URL, ['bearer.' + TOKEN])`, as a browser page would, sends
//       one message and prints {"open", "protocol", "echo", "error"} as one JSON line.
"use strict";

const WebSocket = require("ws");
const mode = process.argv[2];
const done = (result) => {
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(0);
};

if (mode === "server") {
  const server = new WebSocket.WebSocketServer({ host: "127.0.0.1", port: 0 }, () => {
    process.stdout.write(JSON.stringify({ port: server.address().port }) + "\n");
  });
  server.on("connection", (ws, req) => {
    const line = { event: "connection", protocol: req.headers["sec-websocket-protocol"] || null };
    process.stdout.write(JSON.stringify(line) + "\n");
    ws.on("message", (data, binary) => ws.send(data, { binary }));
  });
  process.stdin.on("end", () => process.exit(0));
  process.stdin.resume();
} else if (mode === "client") {
  const [url, token] = process.argv.slice(3);
  const ws = new WebSocket(url, ["bearer." + token]);
  const timer = setTimeout(() => done({ open: false, error: "timeout" }), 8000);
  ws.on("error", (e) => { clearTimeout(timer); done({ open: false, error: String(e.message) }); });
  ws.on("open", () => ws.send("hello from ws"));
  ws.on("message", (data) => {
    clearTimeout(timer);
    done({ open: true, protocol: ws.protocol, echo: String(data) });
  });
} else {
  process.stderr.write("usage: node ws.js server | client URL TOKEN\n");
  process.exit(2);
}
