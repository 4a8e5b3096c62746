use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use policy_agent::datapath::{self, DEFAULT_BPFFS, Datapath, Hook, PinLayout};

/// eBPF NetworkPolicy enforcer: node agent and tools.
#[derive(Parser)]
#[command(name = "policy-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: watch the cluster (or a manifest directory) and enforce.
    Run(policy_agent::agent::RunArgs),
    /// Show the local endpoints, their isolation, attachment and map fill.
    Status(policy_agent::status::StatusArgs),
    /// Explain whether a connection is allowed, and which policy decides it.
    Explain(policy_agent::explain::ExplainArgs),
    /// List the pods no policy isolates, per direction, and each namespace's default denies.
    Coverage(policy_agent::coverage::CoverageArgs),
    /// Load the classifier, pin its maps and attach it to one interface (plumbing for
    /// `cargo xtask build-and-load` and tests; the agent attaches by itself).
    Attach(AttachArgs),
    /// Detach the classifier from one interface.
    Detach(AttachArgs),
    /// Remove every link and map pinned under the bpffs directory.
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Install the CNI plugin `policy-enforcer` on the node (the DaemonSet's init container):
    /// copy this binary into the CNI bin directory and chain it in the primary conflist.
    CniInstall(policy_agent::cni::install::InstallArgs),
    /// Take `policy-enforcer` out of the primary conflist, then remove its binary.
    CniUninstall(policy_agent::cni::install::InstallArgs),
}

#[derive(clap::Args)]
struct AttachArgs {
    #[arg(long)]
    iface: String,
    #[arg(long, value_enum, default_value_t = Which::Both)]
    direction: Which,
    #[arg(long, alias = "pin-dir", default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
}

/// `ingress` and `egress` are the interface's TC hooks (host-side veth: ingress = from pod).
#[derive(Clone, Copy, ValueEnum)]
enum Which {
    Ingress,
    Egress,
    Both,
}

impl Which {
    fn hooks(self) -> &'static [Hook] {
        match self {
            Which::Ingress => &[Hook::FromPod],
            Which::Egress => &[Hook::ToPod],
            Which::Both => &Hook::BOTH,
        }
    }
}

/// NetworkPolicy tools of the eBPF policy enforcer, as a kubectl plugin.
// kubectl runs `kubectl-policy` from PATH (here a symlink to this binary) with the words
// after `policy`, its flags included.
#[derive(Parser)]
#[command(name = "kubectl-policy", bin_name = "kubectl policy", version)]
struct PluginCli {
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Explain whether a connection is allowed on the live cluster, and which policy decides it.
    Explain(policy_agent::explain::ExplainArgs),
    /// List the pods no policy isolates, per direction, and each namespace's default denies.
    Coverage(policy_agent::coverage::CoverageArgs),
    /// Show what a node's agent last published (ConfigMap policy-agent-status-NODE).
    Status(policy_agent::publish::NodeStatusArgs),
}

/// The name this binary was run as answers for kubectl's plugin lookup.
const PLUGIN_NAME: &str = "kubectl-policy";

fn invoked_as_plugin() -> bool {
    std::env::args_os().next().is_some_and(|arg0| std::path::Path::new(&arg0).file_name().is_some_and(|n| n == PLUGIN_NAME))
}

fn plugin_main() -> ExitCode {
    match PluginCli::parse().command {
        PluginCommand::Explain(args) => policy_agent::explain::main(&args),
        PluginCommand::Coverage(args) => policy_agent::coverage::main(&args),
        PluginCommand::Status(args) => policy_agent::publish::node_status_main(&args),
    }
}

/// The name the container runtime runs this binary by, as a CNI plugin.
fn invoked_as_cni_plugin() -> bool {
    std::env::args_os().next().is_some_and(|arg0| std::path::Path::new(&arg0).file_name().is_some_and(|n| n == policy_agent::cni::PLUGIN_TYPE))
}

fn main() -> ExitCode {
    policy_agent::alloc::commit_on_use();
    if invoked_as_plugin() {
        return plugin_main();
    }
    if invoked_as_cni_plugin() {
        return policy_agent::cni::plugin::main();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Status(args) => policy_agent::status::main(&args).map_err(Into::into),
        Command::Explain(args) => return policy_agent::explain::main(&args),
        Command::Coverage(args) => return policy_agent::coverage::main(&args),
        Command::Attach(args) => attach(&args),
        Command::Detach(args) => detach(&args),
        Command::Cleanup { bpffs } => cleanup(&bpffs),
        Command::CniInstall(args) => report(policy_agent::cni::install::install(&args)),
        Command::CniUninstall(args) => report(policy_agent::cni::install::uninstall(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: policy_agent::agent::RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(policy_agent::agent::run(args))?;
    Ok(())
}

fn attach(args: &AttachArgs) -> anyhow::Result<()> {
    let mut datapath = Datapath::load(PinLayout::new(&args.bpffs))?;
    for &hook in args.direction.hooks() {
        let attached = datapath.attach(&args.iface, hook)?;
        println!(
            "attached {} to {} ({}) program id {} link {}{}",
            hook,
            args.iface,
            match hook {
                Hook::FromPod => "tc ingress",
                Hook::ToPod => "tc egress",
            },
            attached.program_id,
            attached.link.display(),
            if attached.replaced { " (replaced)" } else { "" }
        );
    }
    for name in datapath::map_name::ALL {
        println!("map {}", datapath.pins().map(name).display());
    }
    Ok(())
}

fn detach(args: &AttachArgs) -> anyhow::Result<()> {
    let pins = PinLayout::new(&args.bpffs);
    for &hook in args.direction.hooks() {
        let what = if datapath::detach(&pins, &args.iface, hook)? { "detached" } else { "was not attached:" };
        println!("{what} {hook} on {}", args.iface);
    }
    Ok(())
}

fn cleanup(bpffs: &std::path::Path) -> anyhow::Result<()> {
    for path in datapath::cleanup(&PinLayout::new(bpffs))? {
        println!("removed {}", path.display());
    }
    Ok(())
}

fn report(done: Result<Vec<String>, policy_agent::AgentError>) -> anyhow::Result<()> {
    for line in done? {
        println!("{line}");
    }
    Ok(())
}
