//! The registry of bdevs and controllers.
