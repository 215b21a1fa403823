//! JSON-RPC 2.0 control socket.
