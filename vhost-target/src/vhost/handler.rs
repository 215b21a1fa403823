//! vhost-user control protocol.
