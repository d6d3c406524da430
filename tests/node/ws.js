// Node's `ws` on both ends of the gate, for tests/node_clients.rs.
//
//   node ws.js server [deflate]
//       A `ws` echo server on 127.0.0.1:0 that selects no subprotocol (as `ws` does
//       without handleProtocols), with permessage-deflate enabled when `deflate` is given
//       (`ws` servers have it off by default). Prints {"port": N}, then a line per
//       connection with the subprotocol and extensions it was offered; ends when stdin
//       closes.
//   node ws.js client URL TOKEN [BYTES]
//       Opens `new WebSocket(URL, ['bearer.' + TOKEN])`, as a browser page would (`ws`
//       clients offer permessage-deflate by default), sends one message (a JSON-like text
//       of BYTES bytes when given) and prints {"open", "protocol", "extensions", "echo",
//       "same", "error"} as one JSON line.
"use strict";

const WebSocket = require("ws");
const mode = process.argv[2];
const done = (result) => {
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(0);
};

if (mode === "server") {
  const perMessageDeflate = process.argv[3] === "deflate";
  const server = new WebSocket.WebSocketServer({ host: "127.0.0.1", port: 0, perMessageDeflate }, () => {
    process.stdout.write(JSON.stringify({ port: server.address().port }) + "\n");
  });
  server.on("connection", (ws, req) => {
    const line = {
      event: "connection",
      protocol: req.headers["sec-websocket-protocol"] || null,
      extensions: req.headers["sec-websocket-extensions"] || null,
    };
    process.stdout.write(JSON.stringify(line) + "\n");
    ws.on("message", (data, binary) => ws.send(data, { binary }));
  });
  process.stdin.on("end", () => process.exit(0));
  process.stdin.resume();
} else if (mode === "client") {
  const [url, token, bytes] = process.argv.slice(3);
  let message = "hello from ws";
  if (bytes) {
    const rows = [];
    for (let i = 0; rows.join(",").length < Number(bytes); i++) {
      rows.push(JSON.stringify({ id: i, user: "user-" + (i % 7), room: "lobby", ok: i % 3 === 0 }));
    }
    message = ("[" + rows.join(",")).slice(0, Number(bytes));
  }
  const ws = new WebSocket(url, ["bearer." + token]);
  const timer = setTimeout(() => done({ open: false, error: "timeout" }), 8000);
  ws.on("error", (e) => { clearTimeout(timer); done({ open: false, error: String(e.message) }); });
  ws.on("open", () => ws.send(message));
  ws.on("message", (data) => {
    clearTimeout(timer);
    const echo = String(data);
    done({
      open: true,
      protocol: ws.protocol,
      extensions: ws.extensions,
      echo: echo.slice(0, 40),
      same: echo === message,
    });
  });
} else {
  process.stderr.write("usage: node ws.js server | client URL TOKEN\n");
  process.exit(2);
}
