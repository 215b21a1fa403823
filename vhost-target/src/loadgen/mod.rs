//! Guest-less vhost-user-blk load generator.
