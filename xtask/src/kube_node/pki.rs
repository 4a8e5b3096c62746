//! The node's certificates and credentials, with the openssl command line: a CA, the API
//! server's serving certificate (the node address, the `kubernetes` Service's ClusterIP and
//! names, loopback), its client certificate towards kubelet, the service-account key pair,
//! and one admin token that every component and the user's kubeconfig authenticate with (a
//! throwaway single-node cluster; RBAC still applies to the pods' ServiceAccounts).

use std::io::Read as _;

use anyhow::Result;

use super::{API_PORT, KUBECONFIG, NODE_IP, host::sh, work};

/// The first address of the Service range: the `kubernetes` Service.
pub const KUBERNETES_SERVICE_IP: &str = "198.19.0.1";

pub fn generate() -> Result<()> {
    let dir = work("pki");
    std::fs::create_dir_all(&dir)?;
    let f = |name: &str| dir.join(name).display().to_string();
    sh("openssl", &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &f("ca.key")])?;
    sh(
        "openssl",
        &[
            "req", "-x509", "-new", "-key", &f("ca.key"), "-subj", "/CN=policy-kube-node-ca", "-days", "30", "-out", &f("ca.crt"), "-addext",
            "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )?;
    let sans = format!(
        "IP:{NODE_IP},IP:{KUBERNETES_SERVICE_IP},IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,\
         DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    );
    sign(&dir, "apiserver", "/CN=kube-apiserver", &format!("subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"))?;
    sign(&dir, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", "extendedKeyUsage=clientAuth\n")?;
    sh("openssl", &["genrsa", "-out", &f("sa.key"), "2048"])?;
    sh("openssl", &["rsa", "-in", &f("sa.key"), "-pubout", "-out", &f("sa.pub")])?;
    let token = random_token()?;
    std::fs::write(dir.join("tokens.csv"), format!("{token},admin,admin-uid,\"system:masters\"\n"))?;
    std::fs::write(KUBECONFIG, kubeconfig(&token, &f("ca.crt")))?;
    Ok(())
}

/// An ECDSA key and a certificate signed by the CA, with `extensions` (openssl extfile).
fn sign(dir: &std::path::Path, name: &str, subject: &str, extensions: &str) -> Result<()> {
    let f = |suffix: &str| dir.join(format!("{name}{suffix}")).display().to_string();
    let ca = |file: &str| dir.join(file).display().to_string();
    std::fs::write(f(".ext"), format!("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n{extensions}"))?;
    sh("openssl", &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &f(".key")])?;
    sh("openssl", &["req", "-new", "-key", &f(".key"), "-subj", subject, "-out", &f(".csr")])?;
    sh(
        "openssl",
        &[
            "x509", "-req", "-in", &f(".csr"), "-CA", &ca("ca.crt"), "-CAkey", &ca("ca.key"), "-CAcreateserial", "-days", "30", "-extfile",
            &f(".ext"), "-out", &f(".crt"),
        ],
    )?;
    Ok(())
}

fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn kubeconfig(token: &str, ca: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: policy-kube-node\n  cluster:\n    server: https://{NODE_IP}:{API_PORT}\n    \
         certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: policy-kube-node\n  context:\n    \
         cluster: policy-kube-node\n    user: admin\ncurrent-context: policy-kube-node\n"
    )
}
