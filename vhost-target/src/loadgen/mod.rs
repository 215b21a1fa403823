//! Guest-less vhost-user-blk load generator. (Placeholder until the loadgen work lands.)

/// Command-line arguments of `vhost-target loadgen`.
#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    /// The vhost-user-blk socket to drive.
    #[arg(long)]
    pub socket: std::path::PathBuf,
}

/// Runs the load generator as `vhost-target loadgen` does.
pub fn run(args: &LoadgenArgs) -> anyhow::Result<()> {
    anyhow::bail!("load generator not built yet (socket {})", args.socket.display())
}
