//! SPDK-format configuration files.
