//! A real control plane for the kube-mode tests: etcd and kube-apiserver (v1.20.2, built and
//! cached by `cargo xtask kube`) on free 127.0.0.1 ports of the host's network namespace, with
//! generated certificates and service-account keys, token authentication (an admin token and
//! one for a ServiceAccount user), RBAC, and kubeconfigs. Both processes stop by PID on drop
//! (also on panic; SIGKILL by the kernel if the test process dies) and their data goes.
//!
//! The agent runs in a simulated node's network namespace, whose loopback is not the host's:
//! a [`Relay`] listens on the node namespace's 127.0.0.1 and forwards each connection to the
//! API server on the host's 127.0.0.1 (the relay's threads connect from the host namespace).
//! The agent's kubeconfig names `https://127.0.0.1:<relay port>`, so the serving certificate
//! (IP SAN 127.0.0.1) verifies as it is, and no address outside loopback is used.

use std::{
    ffi::OsString,
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{Netns, TEST_RUN_DIR, remove_run_dir, run_prefix, sh};

pub const KUBE_VERSION: &str = "v1.20.2";
/// Set by `cargo xtask test`: the directory with `kube-apiserver` and `kubectl`.
pub const BIN_ENV: &str = "POLICY_KUBE_BIN";
/// Range for Service cluster IPs (the API server allocates one for `kubernetes`); nothing
/// routes it. Inside the test ranges like every other address.
const SERVICE_RANGE: &str = "198.19.254.0/24";
/// What the API server announces as its own address (only stored, never used: no endpoint
/// reconciler); without it a 1.20 server bound to loopback looks for a default route.
const ADVERTISE: &str = "198.19.255.1";

/// The binary directory: `$POLICY_KUBE_BIN`, else xtask's cache
/// (`~/.cache/policy-enforcer/kubernetes-v1.20.2/bin`). Panics with what to run if empty.
pub fn bin_dir() -> PathBuf {
    let dir = std::env::var_os(BIN_ENV).filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| {
        let base = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| {
            std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from).join(".cache")
        });
        base.join("policy-enforcer").join(format!("kubernetes-{KUBE_VERSION}")).join("bin")
    });
    assert!(
        dir.join("kube-apiserver").is_file() && dir.join("kubectl").is_file(),
        "no kube-apiserver/kubectl in {} (${BIN_ENV}); run `cargo xtask kube` (or `cargo xtask test`) first",
        dir.display()
    );
    dir
}

fn etcd_binary() -> PathBuf {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no etcd: install Debian's etcd-server (cargo xtask kube does)"))
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0").local_addr().expect("local addr").port()
}

fn random_token() -> String {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).expect("read /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Spawns `cmd` with its output appended to `log`; the kernel kills it if the spawning thread
/// dies (a killed test run leaves no control plane behind).
fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open log");
    let err = out.try_clone().expect("clone log fd");
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// SIGTERM, then SIGKILL after `grace`; reaps the process.
fn stop(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: signalling our own child, which we have not reaped yet.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < grace {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Writes the static token file: `admin` (system:masters) and the ServiceAccount
/// `(namespace, name)`; returns the ServiceAccount's user name.
fn write_token_file(path: &Path, admin_token: &str, sa_token: &str, (sa_ns, sa_name): (&str, &str)) -> String {
    let sa_user = format!("system:serviceaccount:{sa_ns}:{sa_name}");
    std::fs::write(
        path,
        format!(
            "{admin_token},admin,admin-uid,\"system:masters\"\n{sa_token},{sa_user},{sa_ns}-{sa_name}-uid,\"system:serviceaccounts,system:serviceaccounts:{sa_ns}\"\n"
        ),
    )
    .expect("write token file");
    sa_user
}

/// etcd on free loopback ports, data under `dir`/etcd; the child and its client URL.
fn start_etcd(dir: &Path) -> (Child, String) {
    let (etcd_port, peer_port) = (free_port(), free_port());
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let etcd = spawn_logged(
        Command::new(etcd_binary())
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg("--logger=zap")
            .arg("--log-level=warn"),
        &dir.join("etcd.log"),
    );
    (etcd, etcd_url)
}

/// kube-apiserver's flags: loopback only, the test certificates, token authentication, RBAC.
fn apiserver_args(etcd_url: &str, port: u16, certs: &Path, token_file: &Path) -> Vec<OsString> {
    let p = |name: &str| certs.join(name).into_os_string();
    let mut apiserver_args: Vec<OsString> = vec![
        format!("--etcd-servers={etcd_url}").into(),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={port}").into(),
        "--insecure-port=0".into(),
        format!("--advertise-address={ADVERTISE}").into(),
        format!("--service-cluster-ip-range={SERVICE_RANGE}").into(),
        format!("--cert-dir={}", certs.display()).into(),
    ];
    for (flag, file) in [
        ("--tls-cert-file", "server.crt"),
        ("--tls-private-key-file", "server.key"),
        ("--service-account-key-file", "sa.pub"),
        ("--service-account-signing-key-file", "sa.key"),
    ] {
        let mut arg = OsString::from(format!("{flag}="));
        arg.push(p(file));
        apiserver_args.push(arg);
    }
    apiserver_args.extend(
        [
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=RBAC",
            // No controller-manager creates the default ServiceAccounts pods would need.
            "--disable-admission-plugins=ServiceAccount",
            // No endpoints for the `kubernetes` Service: nothing routes to it anyway.
            "--endpoint-reconciler-type=none",
            // The install DaemonSet asks for capabilities; `privileged` needs this too.
            "--allow-privileged=true",
            "--anonymous-auth=false",
            "--profiling=false",
        ]
        .map(OsString::from),
    );
    apiserver_args.push(format!("--token-auth-file={}", token_file.display()).into());
    apiserver_args
}

/// etcd and kube-apiserver for one test, with an admin identity and a ServiceAccount identity.
pub struct ApiServer {
    dir: PathBuf,
    bin: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    apiserver_args: Vec<OsString>,
    pub port: u16,
    /// The CA that signed the serving certificate (kubeconfigs refer to this file).
    pub ca_file: PathBuf,
    /// Kubeconfig of `admin` (group system:masters), server on the host's 127.0.0.1.
    pub admin_kubeconfig: PathBuf,
    /// Token of `system:serviceaccount:<namespace>:<name>` (in its groups too); RBAC grants it
    /// nothing until a binding does.
    pub service_account_token: String,
    pub service_account_user: String,
}

impl ApiServer {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers (3 to 5 seconds).
    /// `service_account` is the `(namespace, name)` the second token authenticates as.
    pub fn start(suffix: &str, service_account: (&str, &str)) -> Self {
        let bin = bin_dir();
        let dir = PathBuf::from(TEST_RUN_DIR).join(format!("{}-kube-{suffix}", run_prefix()));
        remove_run_dir(&dir);
        std::fs::create_dir_all(dir.join("etcd")).expect("create etcd dir");
        std::fs::create_dir_all(dir.join("certs")).expect("create certs dir");
        let certs = dir.join("certs");
        generate_certificates(&certs);

        let admin_token = random_token();
        let sa_token = random_token();
        let sa_user = write_token_file(&dir.join("tokens.csv"), &admin_token, &sa_token, service_account);
        let (etcd, etcd_url) = start_etcd(&dir);
        let port = free_port();
        let apiserver_args = apiserver_args(&etcd_url, port, &certs, &dir.join("tokens.csv"));
        let mut server = Self {
            ca_file: certs.join("ca.crt"),
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            bin,
            etcd: Some(etcd),
            apiserver: None,
            apiserver_args,
            port,
            service_account_token: sa_token,
            service_account_user: sa_user,
        };
        server.write_kubeconfig(&server.admin_kubeconfig.clone(), port, &admin_token);
        server.start_apiserver();
        server
    }


    pub fn kubectl_path(&self) -> PathBuf {
        self.bin.join("kubectl")
    }

    /// Writes a kubeconfig for `https://127.0.0.1:<port>` with a bearer `token`.
    pub fn write_kubeconfig(&self, path: &Path, port: u16, token: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: user\ncurrent-context: test\n",
            self.ca_file.display()
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    /// A kubeconfig of the ServiceAccount identity for an API server reached at `port` of
    /// 127.0.0.1 (the relay's port for an agent in a node namespace).
    pub fn service_account_kubeconfig(&self, port: u16) -> PathBuf {
        let path = self.dir.join(format!("service-account-{port}.kubeconfig"));
        self.write_kubeconfig(&path, port, &self.service_account_token);
        path
    }

    /// Runs the kubectl built from the same tree, as admin (unless `args` names another
    /// `--kubeconfig`); returns its output without judging it.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(self.kubectl_path());
        if !args.iter().any(|a| a.starts_with("--kubeconfig")) {
            cmd.arg("--kubeconfig").arg(&self.admin_kubeconfig);
        }
        // kubectl caches discovery per host and port under $HOME: each server gets a cache
        // of its own, so an earlier server on the same port cannot decide what a name means.
        cmd.arg("--cache-dir").arg(self.dir.join("kubectl-cache"));
        cmd.args(args).output().unwrap_or_else(|e| panic!("spawn kubectl {args:?}: {e}"))
    }

    /// Like [`Self::kubectl`], but panics with stderr and the server log if kubectl fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(out.status.success(), "kubectl {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn apiserver_running(&mut self) -> bool {
        self.apiserver.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts kube-apiserver (again, same port and flags: etcd keeps the state) and waits for
    /// `/readyz`.
    pub fn start_apiserver(&mut self) {
        assert!(self.apiserver.is_none(), "kube-apiserver already running");
        let child = spawn_logged(
            Command::new(self.bin.join("kube-apiserver")).args(&self.apiserver_args),
            &self.dir.join("kube-apiserver.log"),
        );
        self.apiserver = Some(child);
        self.wait_ready(Duration::from_secs(60));
    }

    /// Stops kube-apiserver (SIGTERM, SIGKILL after 15 s); etcd keeps running.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            stop(&mut child, Duration::from_secs(15));
        }
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            assert!(self.apiserver_running(), "kube-apiserver exited; log:\n{}", self.log_tail());
            let out = self.kubectl(&["get", "--raw", "/readyz", "--request-timeout=2s"]);
            if out.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("kube-apiserver not ready in {timeout:?}; log:\n{}", self.log_tail());
    }

    /// The last lines of both logs (for failure messages).
    pub fn log_tail(&self) -> String {
        let tail = |name: &str| {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!("--- kube-apiserver ---\n{}\n--- etcd ---\n{}", tail("kube-apiserver.log"), tail("etcd.log"))
    }

    /// A scratch directory removed with the server.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        p
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_apiserver();
        if let Some(mut etcd) = self.etcd.take() {
            stop(&mut etcd, Duration::from_secs(10));
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        remove_run_dir(&self.dir);
    }
}

/// A CA, a serving certificate for 127.0.0.1 and localhost (ECDSA P-256), and an RSA key pair
/// for service-account tokens, with the openssl command line.
fn generate_certificates(dir: &Path) {
    let f = |name: &str| dir.join(name).to_str().expect("utf-8 path").to_owned();
    let ext = f("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    sh(&["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &f("ca.key")]);
    sh(&[
        "openssl", "req", "-x509", "-new", "-key", &f("ca.key"), "-subj", "/CN=policy-enforcer-test-ca", "-days", "2", "-out",
        &f("ca.crt"), "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    sh(&["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &f("server.key")]);
    sh(&["openssl", "req", "-new", "-key", &f("server.key"), "-subj", "/CN=kube-apiserver", "-out", &f("server.csr")]);
    sh(&[
        "openssl", "x509", "-req", "-in", &f("server.csr"), "-CA", &f("ca.crt"), "-CAkey", &f("ca.key"), "-CAcreateserial", "-days",
        "2", "-extfile", &ext, "-out", &f("server.crt"),
    ]);
    sh(&["openssl", "genrsa", "-out", &f("sa.key"), "2048"]);
    sh(&["openssl", "rsa", "-in", &f("sa.key"), "-pubout", "-out", &f("sa.pub")]);
}

/// Forwards TCP connections accepted on 127.0.0.1 of a network namespace to `upstream` on the
/// host's loopback. Stops accepting on drop; open connections end when either side closes.
pub struct Relay {
    stop: Arc<AtomicBool>,
    pub port: u16,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    pub fn start(ns: &Netns, upstream: SocketAddr) -> Self {
        // The socket belongs to the namespace it was created in, whichever thread uses it.
        let listener = ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind relay in the namespace"));
        let port = listener.local_addr().expect("relay addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // Spawned from a thread of the host namespace: connections to `upstream` leave there.
        let accept = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((down, _)) => {
                        let _ = down.set_nonblocking(false);
                        // API server down: close at once, as a refused connection would.
                        let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) else { continue };
                        pipe(down, up);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self { stop, port, accept: Some(accept) }
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    for (mut from, mut to) in [(a, b2), (b, a2)] {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
            let _ = from.shutdown(std::net::Shutdown::Read);
        });
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}
