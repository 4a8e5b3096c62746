//! `cni-install` and `cni-uninstall`: what the DaemonSet's init container does on the node.
//! The runtime uses the lexically first network configuration in its conf directory (as
//! libcni sorts `*.conf`, `*.conflist` and `*.json`); the enforcer joins that file's plugin
//! chain, after the primary plugin. A single-plugin `.conf` is not rewritten: it is an
//! error, as converting it would change a file the node's CNI installer owns.

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::{DEFAULT_SOCKET, PLUGIN_TYPE};
use crate::AgentError;

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// The node's CNI plugin directory (as mounted in the init container).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The node's CNI network configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The agent's CNI socket, as the plugin sees it on the node.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: String,
}

fn err(path: &Path, what: impl Into<String>) -> AgentError {
    AgentError::CniInstall { path: path.to_owned(), what: what.into() }
}

/// Copies this executable to `<bin-dir>/policy-enforcer` and chains it in the primary
/// conflist. Idempotent. Returns what it did, one line each.
pub fn install(args: &InstallArgs) -> Result<Vec<String>, AgentError> {
    let exe = std::env::current_exe().map_err(|source| AgentError::Read { path: "/proc/self/exe".into(), source })?;
    let binary = std::fs::read(&exe).map_err(|source| AgentError::Read { path: exe.clone(), source })?;
    let target = args.bin_dir.join(PLUGIN_TYPE);
    write_atomic(&target, &binary, 0o755)?;
    let mut done = vec![format!("installed {}", target.display())];
    let conflist = primary_config(&args.conf_dir)?;
    let text = std::fs::read_to_string(&conflist).map_err(|source| AgentError::Read { path: conflist.clone(), source })?;
    match chain(&conflist, &text, &args.socket)? {
        Some(patched) => {
            write_atomic(&conflist, patched.as_bytes(), 0o644)?;
            done.push(format!("chained {PLUGIN_TYPE} in {}", conflist.display()));
        }
        None => done.push(format!("{} already chains {PLUGIN_TYPE}", conflist.display())),
    }
    Ok(done)
}

/// Takes the enforcer out of the primary conflist first (so no ADD runs a missing binary),
/// then removes the binary.
pub fn uninstall(args: &InstallArgs) -> Result<Vec<String>, AgentError> {
    let mut done = Vec::new();
    let conflist = primary_config(&args.conf_dir)?;
    let text = std::fs::read_to_string(&conflist).map_err(|source| AgentError::Read { path: conflist.clone(), source })?;
    if let Some(patched) = unchain(&conflist, &text)? {
        write_atomic(&conflist, patched.as_bytes(), 0o644)?;
        done.push(format!("removed {PLUGIN_TYPE} from {}", conflist.display()));
    }
    let target = args.bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&target) {
        Ok(()) => done.push(format!("removed {}", target.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(AgentError::Write { path: target, source }),
    }
    Ok(done)
}

/// The file the runtime loads: the lexically first `*.conf`, `*.conflist` or `*.json`; it
/// must be a conflist.
pub fn primary_config(conf_dir: &Path) -> Result<PathBuf, AgentError> {
    let entries = std::fs::read_dir(conf_dir).map_err(|source| AgentError::Read { path: conf_dir.to_owned(), source })?;
    let mut configs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "conf" || x == "conflist" || x == "json"))
        .collect();
    configs.sort();
    let first = configs.into_iter().next().ok_or_else(|| err(conf_dir, "no CNI network configuration (*.conflist): install the primary CNI plugin first"))?;
    if first.extension().is_some_and(|x| x == "conf") {
        return Err(err(&first, "a single-plugin .conf is the runtime's network configuration; the enforcer is a chained plugin and needs a .conflist (rewrite it as {\"cniVersion\",\"name\",\"plugins\":[...]})"));
    }
    Ok(first)
}

/// The conflist with the enforcer appended to `plugins` (or its socket corrected); `None`
/// if it is there already.
pub fn chain(path: &Path, text: &str, socket: &str) -> Result<Option<String>, AgentError> {
    let mut conf = parse_conflist(path, text)?;
    let plugins = plugins_mut(path, &mut conf)?;
    let ours = serde_json::json!({ "type": PLUGIN_TYPE, "socket": socket });
    match plugins.iter_mut().find(|p| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)) {
        Some(existing) if existing.get("socket").and_then(Value::as_str) == Some(socket) => return Ok(None),
        Some(existing) => existing["socket"] = Value::String(socket.to_owned()),
        None => plugins.push(ours),
    }
    render(path, &conf).map(Some)
}

/// The conflist without the enforcer; `None` if it was not there.
pub fn unchain(path: &Path, text: &str) -> Result<Option<String>, AgentError> {
    let mut conf = parse_conflist(path, text)?;
    let plugins = plugins_mut(path, &mut conf)?;
    let before = plugins.len();
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    if plugins.len() == before {
        return Ok(None);
    }
    render(path, &conf).map(Some)
}

fn parse_conflist(path: &Path, text: &str) -> Result<Value, AgentError> {
    let conf: Value = serde_json::from_str(text).map_err(|e| err(path, format!("not JSON: {e}")))?;
    if !conf.is_object() {
        return Err(err(path, "not a JSON object"));
    }
    Ok(conf)
}

fn plugins_mut<'c>(path: &Path, conf: &'c mut Value) -> Result<&'c mut Vec<Value>, AgentError> {
    match conf.get_mut("plugins") {
        Some(Value::Array(plugins)) if !plugins.is_empty() => {
            if let Some(i) = plugins.iter().position(|p| p.get("type").and_then(Value::as_str).is_none()) {
                return Err(err(path, format!("plugins[{i}].type: missing or not a string")));
            }
            Ok(plugins)
        }
        Some(Value::Array(_)) => Err(err(path, "plugins: empty (no primary plugin to chain after)")),
        Some(_) => Err(err(path, "plugins: not a list")),
        None => Err(err(path, "plugins: missing (a conflist lists its plugins)")),
    }
}

fn render(path: &Path, conf: &Value) -> Result<String, AgentError> {
    let mut text = serde_json::to_string_pretty(conf).map_err(|e| err(path, format!("encode: {e}")))?;
    text.push('\n');
    Ok(text)
}

/// Writes a hidden temporary file beside `path` (the runtime reads no dot-file ending
/// `.tmp`), then renames it over `path`: readers see the old or the new file, never half.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AgentError> {
    let dir = path.parent().ok_or_else(|| err(path, "no parent directory"))?;
    let name = path.file_name().ok_or_else(|| err(path, "no file name"))?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write_err = |source| AgentError::Write { path: tmp.clone(), source };
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()
    })();
    if let Err(source) = written.map_err(write_err).and_then(|()| std::fs::rename(&tmp, path).map_err(|source| AgentError::Write { path: path.to_owned(), source })) {
        let _ = std::fs::remove_file(&tmp);
        return Err(source);
    }
    Ok(())
}
