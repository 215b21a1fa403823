fn main() -> anyhow::Result<()> {
    replicator::cli::main()
}
