// Socket.IO 4 on both ends of the gate, for tests/node_clients.rs.
//
//   node socketio.js server
//       A Socket.IO server on 127.0.0.1:0 (path /socket.io). Prints {"port": N}, then one
//       JSON line per connection: the identity header the gate forwarded and the
//       transport. Answers "echo" with the same payload.
//   node socketio.js client URL TRANSPORTS [TOKEN] [CARRIER]
//       Connects (TRANSPORTS: comma list, e.g. polling,websocket), with the token as an
//       Authorization header or the access_token query parameter (CARRIER: header | query).
//       Prints one JSON line: connected, error, transport (after any upgrade), echo.
"use strict";

const mode = process.argv[2];
const done = (result) => {
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(0);
};

if (mode === "server") {
  const { createServer } = require("http");
  const { Server } = require("socket.io");
  const http = createServer();
  const io = new Server(http, { cookie: { name: "io", httpOnly: true, path: "/" } });
  io.on("connection", (socket) => {
    const line = {
      event: "connection",
      subject: socket.handshake.headers["x-auth-subject"] || null,
      authorization: socket.handshake.headers["authorization"] || null,
      url: socket.handshake.url,
      transport: socket.conn.transport.name,
    };
    process.stdout.write(JSON.stringify(line) + "\n");
    socket.conn.on("upgrade", (t) =>
      process.stdout.write(JSON.stringify({ event: "upgrade", transport: t.name }) + "\n"));
    socket.on("echo", (payload, ack) => ack(payload));
  });
  http.listen(0, "127.0.0.1", () => {
    process.stdout.write(JSON.stringify({ port: http.address().port }) + "\n");
  });
  // Ends with its parent: stdin closes when the test drops it.
  process.stdin.on("end", () => process.exit(0));
  process.stdin.resume();
} else if (mode === "client") {
  const { io } = require("socket.io-client");
  const [url, transports, token, carrier] = process.argv.slice(3);
  const options = {
    transports: transports.split(","),
    reconnection: false,
    timeout: 5000,
  };
  if (token && carrier === "query") options.query = { access_token: token };
  else if (token) options.extraHeaders = { Authorization: `Bearer ${token}` };
  const socket = io(url, options);
  const timer = setTimeout(() => done({ connected: false, error: "timeout" }), 8000);
  socket.on("connect_error", (e) => {
    clearTimeout(timer);
    done({ connected: false, error: String(e && (e.description || e.message)) });
  });
  socket.on("connect", () => {
    const engine = socket.io.engine;
    const finish = () =>
      socket.emit("echo", "hello through the gate", (echo) => {
        clearTimeout(timer);
        done({ connected: true, transport: engine.transport.name, echo });
      });
    // With polling first, wait for the upgrade to the WebSocket (or give up after 2 s).
    if (engine.transport.name === "polling" && options.transports.includes("websocket")) {
      const wait = setTimeout(finish, 2000);
      engine.once("upgrade", () => { clearTimeout(wait); finish(); });
    } else {
      finish();
    }
  });
} else {
  process.stderr.write("usage: node socketio.js server | client URL TRANSPORTS [TOKEN] [CARRIER]\n");
  process.exit(2);
}
