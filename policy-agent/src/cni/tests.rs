use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde_json::json;

use super::{
    endpoint::{Override, apply_overrides},
    install::{chain, primary_config, unchain, write_atomic},
    plugin::{Invocation, NetConf, PodNetwork, error_text, parse_cni_args, parse_prev_result, run},
};
use crate::{
    AgentError,
    state::{ClusterState, PodRef, parse_manifest_str},
};

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn code_of(error: &AgentError) -> u32 {
    match error {
        AgentError::Cni { code, .. } => *code,
        other => panic!("not a CNI error: {other}"),
    }
}

#[test]
fn cni_prev_result_of_ptp_0_4_0() {
    let result = json!({
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "veth1234", "mac": "aa:bb:cc:dd:ee:ff"}, {"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/var/run/netns/cni-1"}],
        "ips": [{"version": "4", "interface": 1, "address": "198.18.64.5/24", "gateway": "198.18.64.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    });
    let network = parse_prev_result(&result).expect("parses");
    assert_eq!(network, PodNetwork { ips: vec![ip("198.18.64.5")], host_interfaces: vec!["veth1234".into()] });
}

#[test]
fn cni_prev_result_of_1_0_0_dual_stack_skips_host_addresses() {
    let result = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "cni0"}, {"name": "vethab", "sandbox": ""}, {"name": "eth0", "sandbox": "/run/netns/x"}],
        "ips": [
            {"interface": 2, "address": "198.18.64.6/32", "gateway": "198.18.0.1"},
            {"interface": 2, "address": "2001:2:0:64::6/128"},
            {"interface": 0, "address": "198.18.0.1/24"},
            {"address": "198.18.64.6/32"}
        ]
    });
    let network = parse_prev_result(&result).expect("parses");
    assert_eq!(network.ips, vec![ip("198.18.64.6"), ip("2001:2:0:64::6")], "the bridge's address is the host's");
    assert_eq!(network.host_interfaces, vec!["cni0".to_owned(), "vethab".to_owned()]);
}

#[test]
fn cni_prev_result_errors_name_the_field() {
    for (result, field) in [
        (json!({"ips": [{"address": "not-an-ip/24"}]}), "prevResult.ips[0].address"),
        (json!({"ips": [{"interface": 3, "address": "198.18.64.5/24"}]}), "prevResult.ips[0].interface"),
        (json!({"ips": [{"interface": "eth0", "address": "198.18.64.5/24"}]}), "prevResult.ips[0].interface"),
        (json!({"interfaces": [{"mac": "x"}]}), "prevResult.interfaces[0].name"),
        (json!({"interfaces": [{"name": "eth0", "sandbox": 3}]}), "prevResult.interfaces[0].sandbox"),
        (json!({"ips": {"address": "198.18.64.5/24"}}), "prevResult.ips"),
    ] {
        let error = parse_prev_result(&result).expect_err("bad input");
        assert!(error.to_string().starts_with(field), "{error} names {field}");
        assert_eq!(code_of(&error), 7);
    }
}

#[test]
fn cni_args_parse_and_reject_pairs_without_equals() {
    let args = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=e2e;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1").expect("parses");
    assert_eq!(args["K8S_POD_NAMESPACE"], "e2e");
    assert_eq!(args["K8S_POD_NAME"], "web-0");
    assert_eq!(args["K8S_POD_UID"], "u-1");
    assert!(parse_cni_args("").expect("empty is fine").is_empty());
    let error = parse_cni_args("K8S_POD_NAME=a;oops").expect_err("no =");
    assert!(error.to_string().contains("CNI_ARGS") && error.to_string().contains("oops"), "{error}");
    assert_eq!(code_of(&error), 4);
}

#[test]
fn cni_net_conf_defaults_and_bad_fields() {
    let conf = NetConf::parse(r#"{"cniVersion":"1.0.0","name":"k8s","type":"policy-enforcer"}"#).expect("parses");
    assert_eq!(conf.socket, PathBuf::from(super::DEFAULT_SOCKET));
    assert_eq!(conf.timeout, std::time::Duration::from_secs(20));
    let conf = NetConf::parse(r#"{"cniVersion":"0.4.0","socket":"/tmp/x.sock","timeoutSeconds":2.5}"#).expect("parses");
    assert_eq!((conf.socket, conf.timeout), (PathBuf::from("/tmp/x.sock"), std::time::Duration::from_millis(2500)));
    for (text, field, code) in [
        ("{", "network configuration", 6),
        ("[]", "network configuration", 6),
        (r#"{"name":"k8s"}"#, "cniVersion", 7),
        (r#"{"cniVersion":"1.0.0","socket":7}"#, "socket", 7),
        (r#"{"cniVersion":"1.0.0","timeoutSeconds":-1}"#, "timeoutSeconds", 7),
        (r#"{"cniVersion":"1.0.0","prevResult":"x"}"#, "prevResult", 7),
    ] {
        let error = NetConf::parse(text).expect_err(text);
        assert!(error.to_string().starts_with(field), "{text}: {error}");
        assert_eq!(code_of(&error), code, "{text}");
    }
}

fn invocation(command: &str, args: &str) -> Invocation {
    let env: BTreeMap<&str, String> = [("CNI_COMMAND", command.to_owned()), ("CNI_CONTAINERID", "c1".to_owned()), ("CNI_ARGS", args.to_owned())].into();
    Invocation::from_env(|k| env.get(k).cloned()).expect("env")
}

#[test]
fn cni_add_without_agent_is_try_again_later_naming_the_pod() {
    let stdin = json!({
        "cniVersion": "1.0.0", "name": "k8s", "type": "policy-enforcer", "socket": "/nonexistent/policy-enforcer-test.sock",
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "veth1"}], "ips": [{"address": "198.18.64.5/32"}]}
    })
    .to_string();
    let error = run(&invocation("ADD", "K8S_POD_NAMESPACE=e2e;K8S_POD_NAME=client"), &stdin).expect_err("no agent");
    assert_eq!(code_of(&error), 11);
    assert!(error.to_string().contains("e2e/client"), "{error}");
    let text: serde_json::Value = serde_json::from_str(&error_text("1.0.0", &error)).expect("JSON");
    assert_eq!((text["code"].as_u64(), text["cniVersion"].as_str()), (Some(11), Some("1.0.0")));
    // DEL always succeeds, CHECK fails, VERSION lists what is read.
    assert_eq!(run(&invocation("DEL", ""), &stdin).expect("DEL succeeds"), None);
    assert_eq!(code_of(&run(&invocation("CHECK", "K8S_POD_NAMESPACE=e2e;K8S_POD_NAME=client"), &stdin).expect_err("no agent")), 11);
    let version: serde_json::Value = serde_json::from_str(&run(&invocation("VERSION", ""), "").expect("VERSION").expect("text")).expect("JSON");
    assert!(version["supportedVersions"].as_array().is_some_and(|v| v.contains(&json!("0.4.0")) && v.contains(&json!("1.0.0"))), "{version}");
}

#[test]
fn cni_add_input_errors() {
    let with_prev = |prev: serde_json::Value| json!({"cniVersion": "1.0.0", "socket": "/nonexistent/x.sock", "prevResult": prev}).to_string();
    let good_prev = json!({"ips": [{"address": "198.18.64.5/32"}]});
    let pod_args = "K8S_POD_NAMESPACE=e2e;K8S_POD_NAME=a";
    for (command, args, stdin, field, code) in [
        ("ADD", pod_args, json!({"cniVersion": "1.0.0"}).to_string(), "prevResult: missing", 7),
        ("ADD", "K8S_POD_NAME=a", with_prev(good_prev.clone()), "CNI_ARGS: K8S_POD_NAMESPACE", 4),
        ("ADD", pod_args, with_prev(json!({"ips": []})), "prevResult.ips", 7),
        ("ADD", pod_args, json!({"cniVersion": "0.2.0", "prevResult": good_prev}).to_string(), "cniVersion: 0.2.0", 1),
        ("GC", pod_args, with_prev(json!({})), "CNI_COMMAND", 4),
    ] {
        let error = run(&invocation(command, args), &stdin).expect_err(field);
        assert!(error.to_string().starts_with(field), "{field}: {error}");
        assert_eq!(code_of(&error), code, "{field}");
    }
    let missing = Invocation::from_env(|_| None).err().expect("no CNI_COMMAND");
    assert!(missing.to_string().contains("CNI_COMMAND"), "{missing}");
}

/// A scratch directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("policy-agent-cni-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const PTP: &str = r#"{"cniVersion":"0.4.0","name":"k8s","plugins":[{"type":"ptp","ipam":{"type":"host-local","subnet":"198.18.64.0/24"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

#[test]
fn cni_conflist_patch_appends_once_and_fixes_the_socket() {
    let path = PathBuf::from("/x/10-k8s.conflist");
    let patched = chain(&path, PTP, "/run/policy-enforcer/cni.sock").expect("patch").expect("changed");
    let conf: serde_json::Value = serde_json::from_str(&patched).expect("JSON");
    let plugins = conf["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.len(), 3);
    assert_eq!(plugins[2], json!({"type": "policy-enforcer", "socket": "/run/policy-enforcer/cni.sock"}));
    assert_eq!(plugins[0]["ipam"]["subnet"], "198.18.64.0/24", "the rest is kept");
    assert_eq!(chain(&path, &patched, "/run/policy-enforcer/cni.sock").expect("patch"), None, "idempotent");
    let moved = chain(&path, &patched, "/run/other.sock").expect("patch").expect("changed");
    let conf: serde_json::Value = serde_json::from_str(&moved).expect("JSON");
    assert_eq!(conf["plugins"].as_array().map(Vec::len), Some(3));
    assert_eq!(conf["plugins"][2]["socket"], "/run/other.sock");
    let removed = unchain(&path, &moved).expect("unchain").expect("changed");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&removed).expect("JSON"), serde_json::from_str::<serde_json::Value>(PTP).expect("JSON"));
    assert_eq!(unchain(&path, PTP).expect("unchain"), None);
}

#[test]
fn cni_conflist_errors_name_the_file_and_field() {
    let path = PathBuf::from("/x/10-k8s.conflist");
    for (text, what) in [
        ("{", "not JSON"),
        (r#"{"cniVersion":"0.4.0","name":"k8s"}"#, "plugins: missing"),
        (r#"{"plugins":[]}"#, "plugins: empty"),
        (r#"{"plugins":{"type":"ptp"}}"#, "plugins: not a list"),
        (r#"{"plugins":[{"type":"ptp"},{"ipam":{}}]}"#, "plugins[1].type"),
    ] {
        let error = chain(&path, text, "/s").expect_err(text);
        assert!(error.to_string().starts_with("/x/10-k8s.conflist: ") && error.to_string().contains(what), "{text}: {error}");
    }
}

#[test]
fn cni_primary_config_is_the_lexically_first_and_must_be_a_conflist() {
    let dir = TempDir::new("conf");
    assert!(primary_config(&dir.0).expect_err("empty").to_string().contains("no CNI network configuration"));
    std::fs::write(dir.0.join("20-other.conflist"), PTP).expect("write");
    std::fs::write(dir.0.join("10-k8s.conflist"), PTP).expect("write");
    std::fs::write(dir.0.join("05-notes.txt"), "x").expect("write");
    std::fs::write(dir.0.join(".05-hidden.conflist.1.tmp"), "x").expect("write");
    assert_eq!(primary_config(&dir.0).expect("found"), dir.0.join("10-k8s.conflist"));
    std::fs::write(dir.0.join("01-ptp.conf"), r#"{"cniVersion":"0.4.0","name":"k8s","type":"ptp"}"#).expect("write");
    let error = primary_config(&dir.0).expect_err("a .conf comes first");
    assert!(error.to_string().contains("01-ptp.conf") && error.to_string().contains(".conflist"), "{error}");
}

#[test]
fn cni_atomic_write_replaces_and_leaves_no_temporary() {
    let dir = TempDir::new("atomic");
    let path = dir.0.join("10-k8s.conflist");
    std::fs::write(&path, "old").expect("write");
    write_atomic(&path, b"new", 0o644).expect("write");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
    let names: Vec<_> = std::fs::read_dir(&dir.0).expect("list").filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("10-k8s.conflist")], "no temporary left");
    let error = write_atomic(&dir.0.join("missing/x"), b"x", 0o644).expect_err("no such dir");
    assert!(error.to_string().contains("missing"), "{error}");
}

fn state_with(yaml: &str) -> ClusterState {
    let (objects, problems) = parse_manifest_str("test.yaml", false, yaml);
    assert!(problems.is_empty(), "{problems:?}");
    ClusterState::from_objects(objects)
}

const PENDING_POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  namespace: e2e\n  uid: u-1\nspec:\n  nodeName: n\n  containers: []\nstatus:\n  phase: Pending\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: b\n  namespace: e2e\nspec:\n  nodeName: n\n  containers: []\nstatus:\n  phase: Running\n  podIPs:\n  - ip: 198.18.64.9\n";

#[test]
fn cni_overrides_fill_only_pods_without_addresses_and_with_the_same_uid() {
    let mut state = state_with(PENDING_POD);
    let untouched_b = state.pods[&PodRef::new("e2e", "b")].clone();
    let cni = |uid: Option<&str>, ips: &[&str]| Override { uid: uid.map(Into::into), container_id: "c".into(), ips: ips.iter().map(|i| ip(i)).collect() };
    let overrides = BTreeMap::from([
        (PodRef::new("e2e", "a"), cni(Some("u-1"), &["198.18.64.5", "2001:2:0:64::5"])),
        (PodRef::new("e2e", "b"), cni(None, &["198.18.64.10"])),
        (PodRef::new("e2e", "gone"), cni(None, &["198.18.64.11"])),
    ]);
    apply_overrides(&mut state, &overrides);
    let a = &state.pods[&PodRef::new("e2e", "a")];
    assert_eq!(crate::resolve::pod_ips(a, &mut Vec::new()), vec![ip("198.18.64.5"), ip("2001:2:0:64::5")]);
    assert!(std::sync::Arc::ptr_eq(&state.pods[&PodRef::new("e2e", "b")], &untouched_b), "a pod with addresses is not cloned");

    let mut state = state_with(PENDING_POD);
    apply_overrides(&mut state, &BTreeMap::from([(PodRef::new("e2e", "a"), cni(Some("u-2"), &["198.18.64.5"]))]));
    assert!(crate::resolve::pod_ips(&state.pods[&PodRef::new("e2e", "a")], &mut Vec::new()).is_empty(), "another pod of the same name");
}

#[test]
fn cni_run_flags_enable_disable_and_time_out() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: crate::agent::RunArgs,
    }
    let parse = |args: &[&str]| <Cli as clap::Parser>::try_parse_from(std::iter::once("run").chain(args.iter().copied())).map(|c| c.run);
    let defaults = parse(&[]).expect("defaults");
    assert_eq!((defaults.cni_socket.as_str(), defaults.no_cni, defaults.cni_timeout_ms), ("", false, 15000), "off unless set");
    assert_eq!(parse(&["--cni-socket", super::DEFAULT_SOCKET]).expect("the DaemonSet's").cni_socket, super::DEFAULT_SOCKET);
    assert_eq!(parse(&["--cni-socket", ""]).expect("empty disables").cni_socket, "");
    assert!(parse(&["--no-cni"]).expect("no-cni").no_cni);
    assert_eq!(parse(&["--cni-timeout-ms", "2000"]).expect("timeout").cni_timeout_ms, 2000);
}
