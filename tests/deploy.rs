//! The deployment artifacts (`Containerfile`, `deploy/kubernetes/`) checked against the
//! real binary: every flag they pass is a flag of `wsgate run`, the ports agree across
//! arguments, container ports, probes and the Service, the ConfigMap policy passes
//! `wsgate check` at the path the sidecar is given, the runtime image holds no development
//! certificate, and the sidecar starts with exactly the manifest's arguments (paths and
//! addresses remapped to a temporary directory and loopback) and answers its probes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_yaml::Value;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// Stands in for the JWT Secret: long enough for wsgate's 32-byte HMAC minimum.
const TEST_SECRET: &str = "deploy-test-secret-0123456789abcdef0123456789abcdef";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------
// Kubernetes manifests
// ---------------------------------------------------------------------------------------

struct Manifest {
    file: String,
    doc: Value,
}

/// Every YAML document of every file under deploy/kubernetes.
fn manifests() -> Vec<Manifest> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut out = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for de in serde_yaml::Deserializer::from_str(&text) {
            let doc = Value::deserialize(de).unwrap_or_else(|e| panic!("{file}: {e}"));
            if !doc.is_null() {
                out.push(Manifest {
                    file: file.clone(),
                    doc,
                });
            }
        }
    }
    out
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

fn find<'a>(ms: &'a [Manifest], k: &str, n: &str) -> &'a Value {
    ms.iter()
        .map(|m| &m.doc)
        .find(|d| kind(d) == k && name(d) == n)
        .unwrap_or_else(|| panic!("no {k} named {n:?} under deploy/kubernetes"))
}

fn only<'a>(ms: &'a [Manifest], k: &str) -> &'a Value {
    let all: Vec<&Value> = ms.iter().map(|m| &m.doc).filter(|d| kind(d) == k).collect();
    assert_eq!(all.len(), 1, "expected exactly one {k}");
    all[0]
}

fn text<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {v:?}"))
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a [Value] {
    v.as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what}: expected a list, found {v:?}"))
}

/// The Deployment, its pod spec and the wsgate container with its arguments.
struct Sidecar<'a> {
    pod: &'a Value,
    container: &'a Value,
    args: Vec<String>,
}

fn sidecar(ms: &[Manifest]) -> Sidecar<'_> {
    let deployment = only(ms, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = seq(&pod["containers"], "containers")
        .iter()
        .find(|c| c["name"].as_str() == Some("wsgate"))
        .expect("the Deployment has no container named wsgate");
    assert!(
        text(&container["image"], "wsgate image").contains("wsgate"),
        "{:?}",
        container["image"]
    );
    let args = seq(&container["args"], "wsgate args")
        .iter()
        .map(|a| text(a, "wsgate args").to_owned())
        .collect();
    Sidecar {
        pod,
        container,
        args,
    }
}

fn volume<'a>(pod: &'a Value, vol: &str) -> &'a Value {
    seq(&pod["volumes"], "volumes")
        .iter()
        .find(|v| v["name"].as_str() == Some(vol))
        .unwrap_or_else(|| panic!("no volume named {vol:?}"))
}

/// The wsgate container's volume mount whose mountPath is `dir`.
fn mount_at<'a>(container: &'a Value, dir: &str) -> &'a Value {
    seq(&container["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["mountPath"].as_str().map(|p| p.trim_end_matches('/')) == Some(dir))
        .unwrap_or_else(|| panic!("no volumeMount at {dir:?} (the directory of a path in args)"))
}

/// The keys a Secret holds (data and stringData), decoded.
fn secret_values(secret: &Value) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    if let Some(data) = secret["data"].as_mapping() {
        for (k, v) in data {
            let k = text(k, "Secret key").to_owned();
            out.insert(k, base64_decode(text(v, "Secret data")));
        }
    }
    if let Some(data) = secret["stringData"].as_mapping() {
        for (k, v) in data {
            let k = text(k, "Secret key").to_owned();
            out.insert(k, text(v, "Secret stringData").as_bytes().to_vec());
        }
    }
    out
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .unwrap_or_else(|| panic!("{s:?} is not base64")) as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// A container port given as a number or by name.
fn resolve_port(port: &Value, container: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).unwrap();
    }
    let want = text(port, "port");
    let found = seq(&container["ports"], "ports")
        .iter()
        .find(|p| p["name"].as_str() == Some(want))
        .unwrap_or_else(|| panic!("no container port named {want:?}"));
    container_port(found)
}

fn container_port(p: &Value) -> u16 {
    u16::try_from(p["containerPort"].as_u64().expect("containerPort")).unwrap()
}

fn container_ports(container: &Value) -> BTreeSet<u16> {
    seq(&container["ports"], "ports")
        .iter()
        .map(container_port)
        .collect()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_mapping().expect("selector");
    !selector.is_empty() && selector.iter().all(|(k, v)| &labels[k] == v)
}

// ---------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------

/// `wsgate run --help`, with no WSGATE_* variables so defaults show as compiled in.
fn run_help() -> String {
    let out = Command::new(BIN)
        .args(["run", "--help"])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Each `--flag` of the help text mapped to its help entry (the flag's line and the
/// indented lines that follow it, until the next flag).
fn help_entries(help: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('-') {
            current = None;
            for token in trimmed.split_whitespace() {
                let token = token.trim_end_matches(',');
                if !token.starts_with('-') {
                    break;
                }
                if token.starts_with("--") {
                    out.insert(token.to_owned(), String::new());
                    current = Some(token.to_owned());
                }
            }
        } else if trimmed.is_empty() || !line.starts_with(' ') {
            current = None;
        }
        if let Some(flag) = &current {
            let entry = out.get_mut(flag).unwrap();
            entry.push_str(line);
            entry.push('\n');
        }
    }
    assert!(
        out.contains_key("--policy") && out.contains_key("--admin"),
        "cannot read the flags of `wsgate run --help`:\n{help}"
    );
    out
}

/// The `[name: value]` annotation of a help entry (`default`, `possible values`).
fn help_annotation(entries: &BTreeMap<String, String>, flag: &str, what: &str) -> Option<String> {
    let entry = entries.get(flag)?;
    let start = entry.find(&format!("[{what}: "))? + what.len() + 3;
    let end = start + entry[start..].find(']')?;
    Some(entry[start..end].to_owned())
}

/// The value given to `--name` in `args` (`--name value` or `--name=value`).
fn flag_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == name {
            return Some(
                it.next()
                    .unwrap_or_else(|| panic!("{name} without a value")),
            );
        }
        if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            return Some(v);
        }
    }
    None
}

/// The variable `wsgate run --help` names for `--name` (`[env: NAME=value]`).
fn env_var(entries: &BTreeMap<String, String>, name: &str) -> Option<String> {
    let shown = help_annotation(entries, name, "env")?;
    Some(shown.split('=').next().unwrap_or_default().to_owned())
}

/// What the image runs with for `--name`: the flag in CMD, else its `WSGATE_` variable from
/// ENV, else the default `wsgate run --help` shows.
fn image_setting(
    cmd: &[String],
    env: &BTreeMap<String, String>,
    entries: &BTreeMap<String, String>,
    name: &str,
) -> String {
    let var =
        env_var(entries, name).unwrap_or_else(|| panic!("{name} has no environment variable"));
    flag_value(cmd, name)
        .map(str::to_owned)
        .or_else(|| env.get(&var).cloned())
        .unwrap_or_else(|| flag_or_default(cmd, entries, name))
}

/// `flag_value`, or the default `wsgate run --help` shows for it.
fn flag_or_default(args: &[String], entries: &BTreeMap<String, String>, name: &str) -> String {
    flag_value(args, name)
        .map(str::to_owned)
        .or_else(|| help_annotation(entries, name, "default"))
        .unwrap_or_else(|| panic!("{name} is neither given nor has a default"))
}

/// Every `--flag` in `args` is a flag of `wsgate run`, flags with a closed set of values
/// get one of them, and the subcommand is `run`.
fn assert_run_args_accepted(args: &[String], entries: &BTreeMap<String, String>, what: &str) {
    assert_eq!(
        args.first().map(String::as_str),
        Some("run"),
        "{what}: {args:?}"
    );
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap();
        assert!(
            entries.contains_key(flag),
            "{what}: {flag} is not a flag of `wsgate run` (it has {:?})",
            entries.keys().collect::<Vec<_>>()
        );
        if let Some(values) = help_annotation(entries, flag, "possible values") {
            let given = flag_value(args, flag).unwrap();
            assert!(
                values.split(", ").any(|v| v == given),
                "{what}: {flag} {given} is not one of {values}"
            );
        }
    }
}

fn check_policy(path: &Path, secret: &str) -> Output {
    Command::new(BIN)
        .arg("check")
        .arg(path)
        .env("WSGATE_JWT_SECRET", secret)
        .output()
        .unwrap()
}

fn assert_policy_valid(path: &Path, what: &str) {
    let out = check_policy(path, TEST_SECRET);
    assert!(
        out.status.success(),
        "{what} fails `wsgate check`:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
}

/// Every value of `key` anywhere in a YAML tree.
fn collect_key(v: &Value, key: &str, out: &mut Vec<String>) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                if k.as_str() == Some(key) {
                    out.push(text(v, key).to_owned());
                }
                collect_key(v, key, out);
            }
        }
        Value::Sequence(s) => s.iter().for_each(|v| collect_key(v, key, out)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes tests
// ---------------------------------------------------------------------------------------

#[test]
fn manifests_parse_and_hold_the_expected_kinds() {
    let ms = manifests();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &ms {
        assert!(
            m.doc["apiVersion"].as_str().is_some() && !name(&m.doc).is_empty(),
            "{}: a document without apiVersion or metadata.name",
            m.file
        );
        *kinds.entry(kind(&m.doc)).or_default() += 1;
    }
    let expected = BTreeMap::from([
        ("ConfigMap", 1),
        ("Deployment", 1),
        ("Secret", 2),
        ("Service", 1),
    ]);
    assert_eq!(kinds, expected);
    for (file, k) in [
        ("configmap.yaml", "ConfigMap"),
        ("deployment.yaml", "Deployment"),
        ("secret.yaml", "Secret"),
        ("service.yaml", "Service"),
    ] {
        assert!(
            ms.iter().any(|m| m.file == file && kind(&m.doc) == k),
            "{file} should hold the {k}"
        );
    }

    // Every reference from the Deployment resolves to a manifest here.
    let s = sidecar(&ms);
    for v in seq(&s.pod["volumes"], "volumes") {
        if let Some(cm) = v["configMap"]["name"].as_str() {
            find(&ms, "ConfigMap", cm);
        }
        if let Some(secret) = v["secret"]["secretName"].as_str() {
            find(&ms, "Secret", secret);
        }
    }
    let deployment = only(&ms, "Deployment");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(
        labels_match(&deployment["spec"]["selector"]["matchLabels"], labels),
        "the Deployment's selector does not match its pod labels"
    );
}

#[test]
fn sidecar_args_are_flags_of_wsgate_run() {
    let ms = manifests();
    let s = sidecar(&ms);
    let entries = help_entries(&run_help());
    assert_run_args_accepted(&s.args, &entries, "deployment.yaml");
    // The image's ENTRYPOINT is the binary: the manifest passes args, not a command.
    assert!(
        s.container["command"].is_null(),
        "the wsgate container must not override the image's ENTRYPOINT"
    );
    assert!(
        !s.args
            .iter()
            .any(|a| a == "--plaintext" || a.starts_with("--plaintext=")),
        "the sidecar terminates TLS itself"
    );
}

#[test]
fn ports_agree_across_args_container_probes_and_service() {
    let ms = manifests();
    let s = sidecar(&ms);
    let entries = help_entries(&run_help());
    let ports = container_ports(s.container);

    let admin: SocketAddr = flag_or_default(&s.args, &entries, "--admin")
        .parse()
        .expect("--admin is an address");
    assert!(
        admin.ip().is_unspecified(),
        "--admin {admin}: kubelet probes connect to the pod IP, so bind 0.0.0.0"
    );
    assert!(
        ports.contains(&admin.port()),
        "admin port {} not in {ports:?}",
        admin.port()
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &s.container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            resolve_port(&get["port"], s.container),
            admin.port(),
            "{probe} port"
        );
    }

    let listen: SocketAddr = flag_or_default(&s.args, &entries, "--listen")
        .parse()
        .expect("--listen is an address");
    assert!(
        listen.ip().is_unspecified(),
        "--listen {listen}: must accept from outside the pod"
    );
    assert_eq!(listen.port(), 8443);
    assert!(
        ports.contains(&listen.port()),
        "listen port {} not in {ports:?}",
        listen.port()
    );

    let service = only(&ms, "Service");
    let pod_labels = &only(&ms, "Deployment")["spec"]["template"]["metadata"]["labels"];
    assert!(
        labels_match(&service["spec"]["selector"], pod_labels),
        "the Service does not select the Deployment's pods"
    );
    let service_ports = seq(&service["spec"]["ports"], "Service ports");
    let mut targets = Vec::new();
    for p in service_ports {
        let target = resolve_port(&p["targetPort"], s.container);
        let port = p["port"].as_u64().unwrap();
        assert_ne!(
            target,
            admin.port(),
            "the Service exposes the admin listener"
        );
        assert_ne!(
            port,
            u64::from(admin.port()),
            "the Service exposes the admin port"
        );
        targets.push((port, target));
    }
    assert!(
        targets.contains(&(443, listen.port())),
        "the Service should map 443 to the gate's {}: {targets:?}",
        listen.port()
    );
}

#[test]
fn configmap_policy_is_valid_at_the_path_the_sidecar_reads() {
    let ms = manifests();
    let s = sidecar(&ms);
    let policy_arg = flag_value(&s.args, "--policy").expect("--policy");
    let (dir, key) = policy_arg.rsplit_once('/').unwrap();
    let mount = mount_at(s.container, dir);
    assert!(
        mount["subPath"].is_null() && mount["subPathExpr"].is_null(),
        "the policy mount uses subPath: it would never see ConfigMap updates"
    );
    assert_eq!(mount["readOnly"].as_bool(), Some(true), "policy mount");
    let vol = volume(s.pod, text(&mount["name"], "mount name"));
    let cm_name = text(
        &vol["configMap"]["name"],
        "the policy volume's configMap.name",
    );
    assert!(
        vol["configMap"]["items"].is_null(),
        "items remap the ConfigMap's keys; mount it whole"
    );
    let cm = find(&ms, "ConfigMap", cm_name);
    let policy = cm["data"][key].as_str().unwrap_or_else(|| {
        panic!("ConfigMap {cm_name} has no key {key:?} (from --policy {policy_arg})")
    });

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(key);
    std::fs::write(&path, policy).unwrap();
    assert_policy_valid(&path, "the ConfigMap policy");

    // Each secret environment variable the policy reads comes from a Secret key that exists.
    let parsed: Value = serde_yaml::from_str(policy).unwrap();
    let mut envs = Vec::new();
    collect_key(&parsed, "hmac_secret_env", &mut envs);
    assert!(!envs.is_empty(), "the policy names no hmac_secret_env");
    for env in envs {
        let var = seq(&s.container["env"], "env")
            .iter()
            .find(|e| e["name"].as_str() == Some(&env))
            .unwrap_or_else(|| {
                panic!("the policy reads {env} but the wsgate container does not set it")
            });
        let r = &var["valueFrom"]["secretKeyRef"];
        let secret = find(&ms, "Secret", text(&r["name"], "secretKeyRef.name"));
        let values = secret_values(secret);
        let placeholder = values
            .get(text(&r["key"], "secretKeyRef.key"))
            .unwrap_or_else(|| panic!("Secret {} lacks key {:?}", name(secret), r["key"]));
        // The placeholder is marked and too short to be accepted: applied by mistake, the
        // gate refuses to start rather than run with a secret published in git.
        let placeholder = String::from_utf8(placeholder.clone()).unwrap();
        assert!(placeholder.contains("REPLACE"), "{placeholder:?}");
        let out = check_policy(&path, &placeholder);
        assert_eq!(
            out.status.code(),
            Some(1),
            "the placeholder secret is accepted"
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("HMAC secret"));
    }

    // A sidecar's upstream is the app in the same pod.
    let mut upstreams = Vec::new();
    collect_key(&parsed, "upstream", &mut upstreams);
    assert!(!upstreams.is_empty());
    for u in upstreams {
        assert!(
            u.starts_with("ws://127.0.0.1:"),
            "upstream {u} is not the app on localhost"
        );
    }
}

#[test]
fn tls_files_come_from_a_tls_secret_mounted_whole() {
    let ms = manifests();
    let s = sidecar(&ms);
    for (flag, key) in [("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")] {
        let arg = flag_value(&s.args, flag).unwrap_or_else(|| panic!("{flag}"));
        let (dir, file) = arg.rsplit_once('/').unwrap();
        assert_eq!(file, key, "{flag}: a kubernetes.io/tls Secret holds {key}");
        let mount = mount_at(s.container, dir);
        assert!(
            mount["subPath"].is_null(),
            "{flag}: subPath mounts never see rotations"
        );
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "TLS mount");
        let vol = volume(s.pod, text(&mount["name"], "mount name"));
        let secret = find(
            &ms,
            "Secret",
            text(&vol["secret"]["secretName"], "secretName"),
        );
        assert_eq!(secret["type"].as_str(), Some("kubernetes.io/tls"));
        let values = secret_values(secret);
        let placeholder = String::from_utf8(values[key].clone()).unwrap();
        assert!(
            placeholder.contains("REPLACE") && !placeholder.contains("-----BEGIN"),
            "Secret {}/{key} should be an obvious placeholder, not a key: {placeholder:?}",
            name(secret)
        );
    }
}

#[test]
fn shutdown_and_security_settings() {
    let ms = manifests();
    let s = sidecar(&ms);
    let entries = help_entries(&run_help());
    let drain: u64 = flag_or_default(&s.args, &entries, "--drain-seconds")
        .parse()
        .unwrap();
    let delay: u64 = flag_or_default(&s.args, &entries, "--shutdown-delay-seconds")
        .parse()
        .unwrap();
    assert!(
        delay > 0,
        "without a shutdown delay, clients routed to the pod before the endpoints update are refused"
    );
    let grace = s.pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds is set explicitly");
    assert!(
        grace > delay + drain,
        "grace period {grace} s must exceed --shutdown-delay-seconds {delay} + --drain-seconds {drain}"
    );
    // The delay replaces a preStop sleep (the image has no shell to run one).
    assert!(
        s.container["lifecycle"]["preStop"].is_null(),
        "a preStop hook besides --shutdown-delay-seconds"
    );

    let sc = &s.container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    let dropped: Vec<&str> = seq(&sc["capabilities"]["drop"], "capabilities.drop")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(dropped.contains(&"ALL"), "{dropped:?}");
    let uid = sc["runAsUser"].as_u64().expect("runAsUser");
    assert_ne!(uid, 0);
    // The same user as the image's USER.
    let user = last_stage(&containerfile()).user();
    assert_eq!(
        user.0, uid,
        "runAsUser differs from the Containerfile's USER"
    );

    for r in ["requests", "limits"] {
        assert!(
            s.container["resources"][r]["memory"].as_str().is_some(),
            "resources.{r}.memory"
        );
    }
}

/// Lay out `files` in `dir` the way kubelet mounts a ConfigMap or Secret volume:
/// `name -> ..data/name`, `..data -> ..<timestamp>`.
fn kubelet_volume(dir: &Path, files: &[(&str, &[u8])]) {
    let version = dir.join("..2026_01_01_00_00_00.1");
    std::fs::create_dir_all(&version).unwrap();
    for (name, bytes) in files {
        std::fs::write(version.join(name), bytes).unwrap();
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
    }
    std::os::unix::fs::symlink("..2026_01_01_00_00_00.1", dir.join("..data")).unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over plain HTTP: the status code, or None when nothing answers.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.split_whitespace().nth(1)?.parse().ok()
}

struct Gate(std::process::Child);

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sidecar_starts_with_the_manifest_args_and_answers_its_probes() {
    let ms = manifests();
    let s = sidecar(&ms);
    let tmp = tempfile::tempdir().unwrap();

    // Materialise every volume the sidecar mounts, kubelet-style, under tmp/<volume>: the
    // ConfigMap with its real data; the TLS Secret with the development certificate in
    // place of the placeholders.
    let mut remap: Vec<(String, PathBuf)> = Vec::new();
    for m in seq(&s.container["volumeMounts"], "volumeMounts") {
        let vol_name = text(&m["name"], "mount name");
        let vol = volume(s.pod, vol_name);
        let dir = tmp.path().join(vol_name);
        std::fs::create_dir(&dir).unwrap();
        if let Some(cm) = vol["configMap"]["name"].as_str() {
            let data = find(&ms, "ConfigMap", cm)["data"].as_mapping().unwrap();
            let files: Vec<(&str, &[u8])> = data
                .iter()
                .map(|(k, v)| (k.as_str().unwrap(), v.as_str().unwrap().as_bytes()))
                .collect();
            kubelet_volume(&dir, &files);
        } else if let Some(secret) = vol["secret"]["secretName"].as_str() {
            assert_eq!(
                find(&ms, "Secret", secret)["type"].as_str(),
                Some("kubernetes.io/tls")
            );
            let cert = std::fs::read(repo().join("certs/localhost.pem")).unwrap();
            let key = std::fs::read(repo().join("certs/localhost.key")).unwrap();
            kubelet_volume(&dir, &[("tls.crt", &cert), ("tls.key", &key)]);
        } else {
            panic!("volume {vol_name}: unexpected source {vol:?}");
        }
        let mount_path = text(&m["mountPath"], "mountPath").trim_end_matches('/');
        remap.push((format!("{mount_path}/"), dir));
    }

    // The manifest's args, with mounted paths moved into tmp and the addresses on loopback.
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut args: Vec<String> = Vec::new();
    let mut it = s.args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--admin" | "--listen" => {
                it.next();
            }
            _ => args.push(
                remap
                    .iter()
                    .find_map(|(prefix, dir)| {
                        a.strip_prefix(prefix.as_str())
                            .map(|rest| dir.join(rest).to_string_lossy().into_owned())
                    })
                    .unwrap_or_else(|| a.clone()),
            ),
        }
    }
    args.extend([
        "--admin".into(),
        admin.to_string(),
        "--listen".into(),
        listen.to_string(),
    ]);

    let mut cmd = Command::new(BIN);
    cmd.args(&args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("WSGATE_")) {
        cmd.env_remove(k);
    }
    for e in s.container["env"].as_sequence().into_iter().flatten() {
        let var = text(&e["name"], "env name");
        match e["value"].as_str() {
            Some(v) => cmd.env(var, v),
            None => {
                assert!(e["valueFrom"]["secretKeyRef"].is_mapping(), "env {var}");
                cmd.env(var, TEST_SECRET)
            }
        };
    }
    let log = tmp.path().join("wsgate.log");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut gate = Gate(cmd.spawn().unwrap());
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    let readiness = text(
        &s.container["readinessProbe"]["httpGet"]["path"],
        "readiness path",
    );
    let liveness = text(
        &s.container["livenessProbe"]["httpGet"]["path"],
        "liveness path",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if http_status(admin, readiness) == Some(200) {
            break;
        }
        if let Some(status) = gate.0.try_wait().unwrap() {
            panic!("wsgate {args:?} exited with {status}:\n{}", logs());
        }
        assert!(
            Instant::now() < deadline,
            "{readiness} never answered 200:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http_status(admin, liveness), Some(200), "{liveness}");
    TcpStream::connect_timeout(&listen, Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("the gate's listener {listen}: {e}"));
    // --log-format json is in force (the start-up lines may land just after /readyz
    // turns 200).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !logs().contains('\n') {
        assert!(Instant::now() < deadline, "wsgate logged nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    let written = logs();
    // Whole lines only: the last one may still be being written.
    for line in written[..written.rfind('\n').unwrap()].lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON log line: {line}"
        );
    }

    // SIGTERM, as kubelet sends it: readiness turns 503 at once, the listener goes on
    // accepting through the shutdown delay, and with no open connections the process exits
    // 0 right after it, well within the grace period.
    let delay = Duration::from_secs(
        flag_value(&s.args, "--shutdown-delay-seconds")
            .map_or(0, |d| d.parse().expect("--shutdown-delay-seconds")),
    );
    let pid = gate.0.id().to_string();
    if Command::new("kill")
        .args(["-s", "TERM", &pid])
        .status()
        .is_ok_and(|s| s.success())
    {
        let sent = Instant::now();
        while http_status(admin, readiness) != Some(503) {
            assert!(
                sent.elapsed() < Duration::from_secs(1),
                "{readiness} not 503 after SIGTERM:\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        if delay >= Duration::from_secs(1) {
            TcpStream::connect_timeout(&listen, Duration::from_secs(1))
                .unwrap_or_else(|e| panic!("the listener during the shutdown delay: {e}"));
        }
        let deadline = sent + delay + Duration::from_secs(3);
        let status = loop {
            if let Some(status) = gate.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM:\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            sent.elapsed() + Duration::from_millis(100) >= delay,
            "exit {:?} after SIGTERM, before the end of the delay",
            sent.elapsed()
        );
        assert!(status.success(), "exit {status} after SIGTERM:\n{}", logs());
    }
}

// ---------------------------------------------------------------------------------------
// Containerfile
// ---------------------------------------------------------------------------------------

struct Stage {
    base: String,
    name: Option<String>,
    /// (INSTRUCTION, rest of the line), continuations joined.
    instructions: Vec<(String, String)>,
}

struct Copy {
    from: Option<String>,
    sources: Vec<String>,
    dest: String,
}

impl Stage {
    fn all<'a>(&'a self, instr: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.instructions
            .iter()
            .filter(move |(i, _)| i == instr)
            .map(|(_, rest)| rest.as_str())
    }

    fn copies(&self) -> Vec<Copy> {
        self.all("COPY").map(parse_copy).collect()
    }

    fn json_array(&self, instr: &str) -> Vec<String> {
        let rest = self
            .all(instr)
            .last()
            .unwrap_or_else(|| panic!("the runtime stage has no {instr}"));
        serde_json::from_str(rest)
            .unwrap_or_else(|e| panic!("{instr} must be a JSON array (exec form): {rest}: {e}"))
    }

    /// The variables ENV sets (`ENV K=V K2="V 2"`, or the legacy `ENV K V`), later ones
    /// winning.
    fn env(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for rest in self.all("ENV") {
            if !rest.split_whitespace().next().unwrap_or("").contains('=') {
                let (k, v) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                out.insert(k.to_owned(), v.trim().to_owned());
                continue;
            }
            for word in rest.split_whitespace() {
                let (k, v) = word
                    .split_once('=')
                    .unwrap_or_else(|| panic!("ENV {rest}: {word} is not K=V"));
                out.insert(k.to_owned(), v.trim_matches('"').to_owned());
            }
        }
        out
    }

    /// USER as (uid, gid); names are refused (the manifests need numbers to check
    /// runAsNonRoot).
    fn user(&self) -> (u64, u64) {
        let user = self
            .all("USER")
            .last()
            .expect("the runtime stage has no USER");
        let (uid, gid) = user.split_once(':').unwrap_or((user, user));
        let parse = |s: &str| {
            s.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("USER {user}: use a numeric uid:gid"))
        };
        (parse(uid), parse(gid))
    }
}

fn parse_copy(rest: &str) -> Copy {
    let mut from = None;
    let mut words = Vec::new();
    let mut tokens = rest.split_whitespace().peekable();
    while let Some(t) = tokens.next_if(|t| t.starts_with("--")) {
        if let Some(f) = t.strip_prefix("--from=") {
            from = Some(f.to_owned());
        }
    }
    let remaining: Vec<&str> = tokens.collect();
    let joined = remaining.join(" ");
    if joined.starts_with('[') {
        words = serde_json::from_str(&joined).expect("COPY in JSON form");
    } else {
        words.extend(remaining.iter().map(|s| (*s).to_owned()));
    }
    assert!(
        words.len() >= 2,
        "COPY {rest}: needs a source and a destination"
    );
    let dest = words.pop().unwrap();
    Copy {
        from,
        sources: words,
        dest,
    }
}

fn containerfile() -> Vec<Stage> {
    let source = std::fs::read_to_string(repo().join("Containerfile")).expect("Containerfile");
    let mut logical = Vec::new();
    let mut pending = String::new();
    for line in source.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                pending.push_str(part);
                pending.push(' ');
            }
            None => {
                pending.push_str(trimmed);
                logical.push(std::mem::take(&mut pending));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical.iter().filter(|l| !l.trim().is_empty()) {
        let (instr, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let instr = instr.to_ascii_uppercase();
        let rest = rest.trim().to_owned();
        if instr == "FROM" {
            let words: Vec<&str> = rest
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, n] if as_.eq_ignore_ascii_case("as") => Some((*n).to_owned()),
                [_] => None,
                _ => panic!("FROM {rest}: cannot parse"),
            };
            stages.push(Stage {
                base: words[0].to_owned(),
                name,
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .unwrap_or_else(|| panic!("{instr} before the first FROM"))
                .instructions
                .push((instr, rest));
        }
    }
    stages
}

fn last_stage(stages: &[Stage]) -> &Stage {
    stages.last().expect("the Containerfile has no FROM")
}

/// `path` (repo-relative) lies at or under the COPY source `source`.
fn covers(source: &str, path: &str) -> bool {
    let source = source.trim_start_matches("./").trim_end_matches('/');
    source == "." || source.is_empty() || path == source || path.starts_with(&format!("{source}/"))
}

/// Files that `src/` compiles in with include_str!/include_bytes!, repo-relative.
fn compiled_in_files() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let code = std::fs::read_to_string(&path).unwrap();
                for mac in ["include_str!(\"", "include_bytes!(\""] {
                    for (i, _) in code.match_indices(mac) {
                        let start = i + mac.len();
                        let rel = &code[start..start + code[start..].find('"').unwrap()];
                        let mut resolved = PathBuf::new();
                        for c in path.parent().unwrap().join(rel).components() {
                            match c {
                                Component::ParentDir => {
                                    resolved.pop();
                                }
                                Component::CurDir => {}
                                c => resolved.push(c),
                            }
                        }
                        let rel = resolved.strip_prefix(repo()).unwrap_or_else(|_| {
                            panic!("{}: includes {rel} outside the repository", path.display())
                        });
                        out.push(rel.to_string_lossy().into_owned());
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo().join("src"), &mut out);
    out
}

/// The `name`s of Cargo.toml's [[bench]] targets.
fn declared_benches() -> Vec<String> {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let mut out = Vec::new();
    let mut in_bench = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bench = line == "[[bench]]";
        } else if in_bench {
            if let Some(v) = line.strip_prefix("name").map(str::trim_start) {
                if let Some(v) = v.strip_prefix('=') {
                    out.push(v.trim().trim_matches('"').to_owned());
                }
            }
        }
    }
    out
}

/// Is `path` excluded from the build context by .containerignore (dockerignore syntax:
/// last matching pattern wins, `!` re-includes; a pattern matching a directory excludes
/// what is under it)? No .containerignore: nothing is.
fn context_ignored(path: &str) -> bool {
    let Ok(ignore) = std::fs::read_to_string(repo().join(".containerignore")) else {
        return false;
    };
    fn seg_match(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => seg_match(&p[1..], s) || (!s.is_empty() && seg_match(p, &s[1..])),
            (Some(b'?'), Some(_)) => seg_match(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => seg_match(&p[1..], &s[1..]),
            _ => false,
        }
    }
    fn glob(p: &[&str], s: &[&str]) -> bool {
        match p.first() {
            // The pattern is used up: it matched s or one of s's parent directories.
            None => true,
            Some(&"**") => (0..=s.len()).any(|i| glob(&p[1..], &s[i..])),
            Some(seg) => {
                !s.is_empty()
                    && seg_match(seg.as_bytes(), s[0].as_bytes())
                    && glob(&p[1..], &s[1..])
            }
        }
    }
    let segments: Vec<&str> = path.split('/').collect();
    let mut excluded = false;
    for line in ignore.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negated, pattern) = match line.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, line),
        };
        let pattern: Vec<&str> = pattern
            .trim_start_matches("./")
            .trim_matches('/')
            .split('/')
            .collect();
        if glob(&pattern, &segments) {
            excluded = !negated;
        }
    }
    excluded
}

#[test]
fn containerfile_build_stage_copies_what_cargo_needs() {
    let stages = containerfile();
    assert!(stages.len() >= 2, "a multi-stage build: at least two FROM");
    let build = &stages[0];
    assert!(
        build.base.contains("rust"),
        "build stage FROM {}",
        build.base
    );
    let copies = build.copies();
    let sources: Vec<&str> = copies
        .iter()
        .filter(|c| c.from.is_none())
        .flat_map(|c| c.sources.iter().map(String::as_str))
        .collect();
    for source in &sources {
        let rel = source.trim_start_matches("./").trim_end_matches('/');
        assert!(
            repo().join(rel).exists(),
            "COPY {source}: not in the repository"
        );
        assert!(
            !context_ignored(rel),
            "COPY {source}: excluded by .containerignore"
        );
    }
    let mut needed: Vec<String> = ["Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs"]
        .map(String::from)
        .to_vec();
    // cargo refuses to parse a manifest whose declared [[bench]] file is missing.
    needed.extend(declared_benches().iter().map(|b| format!("benches/{b}.rs")));
    // src/demo/ compiles in the development certificate and CA.
    let compiled_in = compiled_in_files();
    assert!(
        compiled_in.iter().any(|f| f.starts_with("certs/")),
        "{compiled_in:?}"
    );
    needed.extend(compiled_in);
    for file in &needed {
        assert!(repo().join(file).exists(), "{file}");
        assert!(
            sources.iter().any(|s| covers(s, file)),
            "the build stage does not COPY {file} (sources: {sources:?})"
        );
        assert!(
            !context_ignored(file),
            "{file} is excluded by .containerignore"
        );
    }
    let build_cmd = build
        .all("RUN")
        .find(|r| r.contains("cargo build"))
        .expect("the build stage runs cargo build");
    for part in ["--release", "--locked", "--bin wsgate"] {
        assert!(
            build_cmd.contains(part),
            "cargo build without {part}: {build_cmd}"
        );
    }
}

#[test]
fn containerfile_runtime_stage_holds_only_the_binary_and_the_policy() {
    let stages = containerfile();
    assert!(stages.len() >= 2, "a multi-stage build: at least two FROM");
    let runtime = last_stage(&stages);
    let build_names: Vec<String> = stages[..stages.len() - 1]
        .iter()
        .enumerate()
        .flat_map(|(i, s)| [Some(i.to_string()), s.name.clone()])
        .flatten()
        .collect();
    assert_eq!(
        runtime.all("ADD").count(),
        0,
        "use COPY in the runtime stage"
    );
    let copies = runtime.copies();
    assert_eq!(
        copies.len(),
        2,
        "the runtime stage copies the binary and the policy only"
    );
    for c in &copies {
        for s in c.sources.iter().chain([&c.dest]) {
            assert!(
                !s.contains("certs") && !s.ends_with(".pem") && !s.ends_with(".key"),
                "the runtime image must not contain development certificates: {s}"
            );
        }
    }
    let binary = copies
        .iter()
        .find(|c| c.from.is_some())
        .expect("COPY --from=<build stage> of the binary");
    assert!(build_names.contains(binary.from.as_ref().unwrap()));
    assert_eq!(binary.sources.len(), 1);
    assert!(
        binary.sources[0].ends_with("/target/release/wsgate"),
        "{:?}",
        binary.sources
    );
    let policy = copies
        .iter()
        .find(|c| c.from.is_none())
        .expect("COPY of the policy from the build context");
    assert_eq!(policy.sources.len(), 1);
    let policy_src = policy.sources[0].trim_start_matches("./");
    assert!(
        !context_ignored(policy_src),
        "{policy_src} is excluded by .containerignore"
    );
    assert_policy_valid(&repo().join(policy_src), policy_src);

    assert_eq!(runtime.json_array("ENTRYPOINT"), vec![binary.dest.clone()]);
    let cmd = runtime.json_array("CMD");
    let entries = help_entries(&run_help());
    assert_run_args_accepted(&cmd, &entries, "Containerfile CMD");
    let env = runtime.env();
    for var in env.keys().filter(|v| v.starts_with("WSGATE_")) {
        assert!(
            entries
                .keys()
                .any(|flag| env_var(&entries, flag).as_deref() == Some(var)),
            "ENV {var} is not a variable of `wsgate run`"
        );
    }
    for flag in ["--policy", "--admin", "--tls-cert", "--tls-key"] {
        assert!(
            flag_value(&cmd, flag).is_none(),
            "CMD gives {flag}, which would beat `-e` of its variable: set it with ENV"
        );
    }
    assert_eq!(
        image_setting(&cmd, &env, &entries, "--policy"),
        policy.dest,
        "the image's policy is not where the policy is copied"
    );
    assert!(
        !image_setting(&cmd, &env, &entries, "--tls-cert").is_empty()
            && !image_setting(&cmd, &env, &entries, "--tls-key").is_empty(),
        "the image must name a certificate and key (TLS by default)"
    );

    let (uid, gid) = runtime.user();
    assert!(uid != 0 && gid != 0, "USER {uid}:{gid} is root");

    let exposed: BTreeSet<u16> = runtime
        .all("EXPOSE")
        .flat_map(str::split_whitespace)
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    let admin: SocketAddr = image_setting(&cmd, &env, &entries, "--admin")
        .parse()
        .unwrap();
    let listen: SocketAddr = image_setting(&cmd, &env, &entries, "--listen")
        .parse()
        .unwrap();
    assert!(
        admin.ip().is_unspecified(),
        "the image's admin listener {admin} is unreachable from outside the container"
    );
    assert_eq!(exposed, BTreeSet::from([listen.port(), admin.port()]));
    assert_eq!(exposed, BTreeSet::from([8443, 9901]));
}
