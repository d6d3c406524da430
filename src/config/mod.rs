//! Policy files: read → parse (YAML shape, `file`) → validate (into `policy::Policy`).
//!
//! Errors name where they are: `file:line:column` for what the YAML parser rejects, and
//! the field path (`routes[1].auth.keys[0].jwks_file`) for semantic errors. Validation
//! collects every semantic error instead of stopping at the first.

pub(crate) mod file;
mod locate;
mod unknown;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::policy::Loaded;

pub use validate::{parse_cidr, parse_origin_pattern, validate, validate_for, Purpose};

// Built-in defaults: what a field is when neither the route nor `defaults` sets it.
// Chosen for safety; docs/policy.md ("Policy reference") documents each.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
/// Streams open at once on one HTTP/2 connection (nginx's `http2_max_concurrent_streams`
/// is 128, Envoy's is unbounded); a browser's page and its sockets fit in far fewer.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// The cluster store's key and channel prefix.
pub const DEFAULT_CLUSTER_KEY_PREFIX: &str = "wsgate:";
/// One store round trip on the upgrade path: a loopback or in-zone Redis answers in well
/// under a millisecond, and an upgrade waits at most this long for it.
pub const DEFAULT_CLUSTER_TIMEOUT_MS: u64 = 50;
/// How long a dead gate's connection slots outlive it.
pub const DEFAULT_CLUSTER_LEASE_SECONDS: u64 = 30;
pub const DEFAULT_UPSTREAM: &str = "ws://127.0.0.1:8080";
pub const DEFAULT_TOKEN_SOURCES: &[&str] = &[
    "header",
    "query:access_token",
    "cookie:access_token",
    "subprotocol:bearer.",
];
pub const DEFAULT_ALGORITHMS: &[&str] = &["RS256", "ES256"];
pub const DEFAULT_LEEWAY_SECONDS: u64 = 30;
pub const DEFAULT_JWKS_REFRESH_SECONDS: u64 = 300;
/// Upgrades per second per client key, after the burst. One address is often many clients
/// (an office NAT, a carrier-grade NAT, a corporate proxy), and every one of them
/// reconnects after a restart or a network blip. 20/s keeps up with a hundred users behind
/// one address who each reconnect every few seconds (multi-page apps reconnect on every
/// page load), where nginx's usual per-IP `rate=10r/s burst=20` counts every page asset;
/// a single host flooding at thousands per second still has 99% refused.
pub const DEFAULT_UPGRADES_PER_SECOND: f64 = 20.0;
/// The bucket: a reconnect storm of 100 clients behind one address all get through at
/// once (Socket.IO clients come back 0.5-1.5 s after a restart, then back off up to 5 s,
/// so the storm is about one second wide); 2/s with a burst of 5 took 30 clients 18 s
/// and 107 refusals.
pub const DEFAULT_UPGRADE_BURST: u32 = 100;
/// Open connections per client key: room for the reconnect storm above with two tabs
/// each. The per-subject cap, not this one, is what bounds one user.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 200;
pub const DEFAULT_MAX_CONNECTIONS_PER_SUBJECT: u32 = 10;
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
/// Also the frame limit when no `max_frame_bytes` is set (in the route or `defaults`): the
/// frame limit follows the route's resolved `max_message_bytes`. Browsers and most client
/// libraries send every message as one frame, so a lower frame limit only breaks them.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_MESSAGES_PER_SECOND: f64 = 100.0;
pub const DEFAULT_MESSAGE_BURST: u32 = 200;
pub const DEFAULT_HANDSHAKE: Duration = Duration::from_secs(10);
pub const DEFAULT_UPSTREAM_CONNECT: Duration = Duration::from_secs(5);
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);
pub const DEFAULT_WRITE: Duration = Duration::from_secs(10);
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(20);
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame or message a policy may allow: 64 MiB, tungstenite's default ceiling,
/// kept when the relay became the gate's own (a policy asking for more is a mistake).
pub const MAX_MESSAGE_BYTES_LIMIT: u64 = 64 * 1024 * 1024;

/// Why a policy file was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all (`wsgate check` exits 2).
    #[error("{path}: cannot read policy: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The YAML parser (or the schema, for unknown fields and wrong types) rejected it;
    /// `more` are the file's other unknown fields and values of the wrong type, at their
    /// field paths and, where the text shows them, lines and columns.
    #[error("{path}:{line}:{column}: {}{}", hide_userinfo_in(message), Tail { path, errors: more })]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
        more: Vec<LocatedError>,
    },
    /// Parsed, but the YAML gave no location for the error (a file with merge keys);
    /// `more` as for `Syntax`.
    #[error("{path}: {}{}", hide_userinfo_in(message), Tail { path, errors: more })]
    SyntaxNoLocation {
        path: PathBuf,
        message: String,
        more: Vec<LocatedError>,
    },
    /// Well-formed YAML that does not make a valid policy; every problem found is listed.
    #[error("{}", FieldErrors { path, errors })]
    Invalid {
        path: PathBuf,
        errors: Vec<FieldError>,
        /// The key, JWKS and CA files the refused policy names: a reload waiting for one
        /// of them to appear is tried again when it does.
        files: Vec<PathBuf>,
    },
}

impl ConfigError {
    /// `wsgate check`'s exit code: 2 unreadable, 1 invalid.
    pub fn exit_code(&self) -> u8 {
        match self {
            ConfigError::Unreadable { .. } => 2,
            _ => 1,
        }
    }
}

/// A semantic error at a field path such as `routes[1].ip.deny[0]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

pub use crate::policy::FieldWarning;

/// A field error and the line and column of its value, when the file's text shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedError {
    pub at: Option<(usize, usize)>,
    pub error: FieldError,
}

struct FieldErrors<'a> {
    path: &'a Path,
    errors: &'a [FieldError],
}

impl fmt::Display for FieldErrors<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}: {}: {}",
                self.path.display(),
                hide_userinfo_in(&e.field),
                hide_userinfo_in(&e.message)
            )?;
        }
        Ok(())
    }
}

/// `text` (an error about a value, which may be a URL with a password in the wrong field)
/// with the user information of every URL in it shown as `***`: `http://user:pw@host`
/// becomes `http://***@host`.
pub(crate) fn hide_userinfo_in(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("://") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let start = at + 3;
        out.push_str(&rest[..start]);
        let authority = &rest[start..];
        let (userinfo, end) = crate::policy::authority_userinfo(authority);
        match userinfo {
            Some(user_end) => {
                out.push_str("***");
                out.push_str(&authority[user_end..end]);
            }
            None => out.push_str(&authority[..end]),
        }
        rest = &authority[end..];
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// Field errors after a first error's line, one per line.
struct Tail<'a> {
    path: &'a Path,
    errors: &'a [LocatedError],
}

impl fmt::Display for Tail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for LocatedError { at, error } in self.errors {
            write!(f, "\n{}", self.path.display())?;
            if let Some((line, column)) = at {
                write!(f, ":{line}:{column}")?;
            }
            write!(
                f,
                ": {}: {}",
                hide_userinfo_in(&error.field),
                hide_userinfo_in(&error.message)
            )?;
        }
        Ok(())
    }
}

/// How many bytes of policy text may be read again to locate the errors after the first:
/// a small file's errors are all located, a 16 MiB one's only the first few.
const LOCATE_BUDGET_BYTES: usize = 64 << 20;

/// Read, parse and fully validate the policy at `path` (key and JWKS files included). The
/// warnings of a valid policy are logged, and kept in [`Loaded::warnings`].
///
/// Blocking: call it from `spawn_blocking` inside the runtime.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    load_for(path, Purpose::Run)
}

/// [`load`] for a running gate (its start and its reloads): only from a regular file.
/// Opening a FIFO put in the policy's place would wait for a writer, without a word;
/// `wsgate check` still reads one (`wsgate check <(kubectl get cm …)`).
pub fn load_file(path: &Path) -> Result<Loaded, ConfigError> {
    regular_file(path).map_err(|source| ConfigError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    load(path)
}

/// Whether `path` is a regular file (or a link to one); what cannot be looked at is left
/// for the read to report.
pub fn regular_file(path: &Path) -> std::io::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err(std::io::Error::other("not a regular file")),
        _ => Ok(()),
    }
}

/// [`load`] for `wsgate check`, which usually runs where the gate's secrets are not: an
/// unset `hmac_secret_env` is a warning there (see [`Purpose::Check`]).
pub fn check(path: &Path) -> Result<Loaded, ConfigError> {
    load_for(path, Purpose::Check)
}

/// The largest policy file the gate reads. A policy is a few KiB (a thousand routes are
/// about 200 KiB); a larger file is a mistake (a log, `/dev/zero`) and is not read whole.
pub const MAX_POLICY_BYTES: usize = 16 * 1024 * 1024;

/// The policy file's bytes, at most one past [`MAX_POLICY_BYTES`] (which
/// [`load_bytes`] refuses).
/// A path that is not a regular file (a pipe: `wsgate check <(kubectl get cm …)`) is read
/// for at most [`PIPE_READ_WAIT`]: a FIFO with no writer would otherwise wait forever.
pub fn read_policy(path: &Path) -> std::io::Result<Vec<u8>> {
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let owned = path.to_owned();
        std::thread::Builder::new()
            .name("policy-read".into())
            .spawn(move || {
                let _ = tx.send(read_whole(&owned));
            })?;
        return rx.recv_timeout(PIPE_READ_WAIT).unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "nothing came in {} s (a FIFO with no writer?)",
                    PIPE_READ_WAIT.as_secs()
                ),
            ))
        });
    }
    read_whole(path)
}

/// How long [`read_policy`] waits for a policy that is not a regular file.
pub const PIPE_READ_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn read_whole(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_POLICY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn load_for(path: &Path, purpose: Purpose) -> Result<Loaded, ConfigError> {
    let bytes = read_policy(path).map_err(|source| ConfigError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    let loaded = load_bytes_for(path, &bytes, purpose)?;
    for w in &loaded.warnings {
        tracing::warn!(path = %path.display(), field = %w.field, "policy warning: {}", w.message);
    }
    Ok(loaded)
}

/// How deep `[` and `{` may nest in a policy file. A policy needs three or four levels;
/// the YAML parser's work per token grows with the depth (a 500 KB file nested 100,000
/// deep took over a minute of CPU), so a deeper file is refused before it is parsed.
const MAX_FLOW_DEPTH: usize = 64;

/// Where `[` and `{` first nest deeper than [`MAX_FLOW_DEPTH`] (line and column, from 1).
/// Brackets in quoted strings and comments count too: a file needs dozens of unclosed
/// ones there before this refuses it, and no policy has them.
fn nested_too_deep(yaml: &[u8]) -> Option<(usize, usize)> {
    let (mut depth, mut line, mut line_start) = (0usize, 1usize, 0usize);
    for (at, byte) in yaml.iter().enumerate() {
        match byte {
            b'\n' => {
                line += 1;
                line_start = at + 1;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Some((line, at - line_start + 1));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// Where the second document of a file that holds several begins, and why, as `line`,
/// `column` (from 1) and a message: the first `---` after the file's first key, or the
/// first line indented less than that key, which the YAML parser takes as the start of a
/// new document (a file whose first line was indented by a space, or pasted in).
fn second_document(yaml: &[u8]) -> Option<(usize, usize, &'static str)> {
    let yaml = yaml.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(yaml);
    let text = std::str::from_utf8(yaml).ok()?;
    let mut first_indent = None;
    let mut ended = false;
    for (i, line) in text.split('\n').enumerate() {
        let content = line.trim_start_matches(' ');
        let content_trimmed = content.trim_end();
        if content_trimmed.is_empty() || content_trimmed.starts_with('#') {
            continue;
        }
        let marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']));
        let indent = line.len() - content.len();
        if ended {
            return Some((
                i + 1,
                indent + 1,
                "a second YAML document starts here, after the `...` that ends the first: \
                 a policy file holds one document",
            ));
        }
        if first_indent.is_some() && indent == 0 && content_trimmed == "..." {
            ended = true;
            continue;
        }
        match first_indent {
            // A `---` before the first key starts the first document.
            None if marker => {}
            None => first_indent = Some(indent),
            Some(_) if marker => {
                return Some((
                    i + 1,
                    1,
                    "a second YAML document starts here: a policy file holds one document",
                ))
            }
            Some(first) if indent < first => {
                return Some((
                    i + 1,
                    indent + 1,
                    "this line is indented less than the file's first key, which ends the \
                     policy and starts a second YAML document: start every top-level key in \
                     the first column",
                ))
            }
            Some(_) => {}
        }
    }
    None
}

/// `yaml` without a last document marker (`---`) that only blank lines and comments
/// follow.
fn without_empty_last_document(yaml: &[u8]) -> &[u8] {
    let mut end = yaml.len();
    loop {
        let before = &yaml[..end];
        let before = before.strip_suffix(b"\n").unwrap_or(before);
        let start = before
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        let text = before[start..].trim_ascii();
        if text.is_empty() || text.starts_with(b"#") {
            if start == 0 {
                return yaml;
            }
            end = start;
            continue;
        }
        let marker = text.strip_prefix(b"---").is_some_and(|rest| {
            let rest = rest.trim_ascii();
            rest.is_empty() || rest.starts_with(b"#")
        });
        return if marker && start > 0 {
            &yaml[..start]
        } else {
            yaml
        };
    }
}

/// Parse and validate policy bytes that were read from `path` (relative key paths are
/// resolved against its directory).
pub fn load_bytes(path: &Path, bytes: &[u8]) -> Result<Loaded, ConfigError> {
    load_bytes_for(path, bytes, Purpose::Run)
}

fn load_bytes_for(path: &Path, bytes: &[u8], purpose: Purpose) -> Result<Loaded, ConfigError> {
    let syntax = |e: serde_yaml::Error| match e.location() {
        Some(loc) => {
            let message = strip_location(&e.to_string());
            // The parser marks a repeated key at its map's start; the place to edit is the
            // key's second occurrence.
            let (line, column) = repeated_key(&message)
                .and_then(|key| locate::locate_repeated_key(bytes, &key))
                .unwrap_or((loc.line(), loc.column()));
            ConfigError::Syntax {
                path: path.to_owned(),
                line,
                column,
                message,
                more: Vec::new(),
            }
        }
        None => match second_document(bytes) {
            // The parser says only that there is more than one document, not where.
            Some((line, column, message)) if e.to_string().contains("more than one document") => {
                ConfigError::Syntax {
                    path: path.to_owned(),
                    line,
                    column,
                    message: message.to_owned(),
                    more: Vec::new(),
                }
            }
            _ => ConfigError::SyntaxNoLocation {
                path: path.to_owned(),
                message: in_words(&e.to_string()),
                more: Vec::new(),
            },
        },
    };
    if bytes.len() > MAX_POLICY_BYTES {
        return Err(ConfigError::SyntaxNoLocation {
            path: path.to_owned(),
            message: format!(
                "the file is larger than {} MiB: not a policy",
                MAX_POLICY_BYTES >> 20
            ),
            more: Vec::new(),
        });
    }
    // Plain YAML first: it refuses a key repeated in a map (`require_claims`,
    // `forward_claims`), which the typed parse would let replace the earlier one silently.
    // A byte-order mark (some Windows editors write one) is not YAML content.
    let yaml = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    // A `---` with nothing after it (as `helm template` and `kubectl` output end) starts
    // no second policy.
    let yaml = without_empty_last_document(yaml);
    if let Some((line, column)) = nested_too_deep(yaml) {
        return Err(ConfigError::Syntax {
            path: path.to_owned(),
            line,
            column,
            message: format!(
                "flow collections ('[', '{{') nested more than {MAX_FLOW_DEPTH} deep: not a policy"
            ),
            more: Vec::new(),
        });
    }
    if let Err(e) = std::str::from_utf8(yaml) {
        let (line, column) = line_and_column(yaml, e.valid_up_to());
        return Err(ConfigError::Syntax {
            path: path.to_owned(),
            line,
            column,
            message: format!(
                "invalid UTF-8 (byte 0x{:02X}): a policy is UTF-8 text",
                yaml[e.valid_up_to()]
            ),
            more: Vec::new(),
        });
    }
    let mut document: serde_yaml::Value = serde_yaml::from_slice(yaml).map_err(syntax)?;
    // YAML merge keys (`<<: *defaults`), which shared blocks in hand-written YAML use, are
    // applied to the document, and the policy is read from it; the typed parse of the
    // file's text then gives no line and column for a wrong type, so it is used only for
    // files without them.
    let merges = has_merge_keys(&document);
    if merges {
        document.apply_merge().map_err(syntax)?;
    }
    let typed = match merges {
        true => serde_yaml::from_value(document.clone()),
        false => serde_yaml::from_slice(yaml),
    };
    let parsed: file::PolicyFile = match typed {
        Ok(parsed) => parsed,
        Err(e) => {
            let mut error = syntax(e);
            if let ConfigError::SyntaxNoLocation { message, .. } = &mut error {
                if merges {
                    message.push_str(
                        " (after YAML merge keys are applied the parser gives no place for \
                         an error)",
                    );
                }
            }
            // The typed parse stops at its first error: name every other unknown field,
            // unknown value and value of the wrong type. After merges, serde's error has
            // no field path to tell which of them it is: all are listed.
            let (ConfigError::Syntax { message, more, .. }
            | ConfigError::SyntaxNoLocation { message, more, .. }) = &mut error
            else {
                return Err(error);
            };
            let found = schema_errors(&document);
            // A number out of range is told in the schema's words ("expected at least 1"),
            // not in those of the integer type underneath ("a whole number", which -1 is).
            if let Some(range) = found
                .iter()
                .find(|f| f.message.starts_with("invalid value") && reported(message, &f.field))
            {
                *message = format!("{}: {}", range.field, range.message);
            }
            *more = located(
                yaml,
                found.into_iter().filter(|f| !reported(message, &f.field)),
            );
            return Err(error);
        }
    };
    // The typed parse reads a number, a boolean or `~` into a text field (`kid: 7` as
    // the text "7"); the schema takes only text there, and
    // so does the policy, as `wsgate schema` tells an editor. (A value out of its range is
    // left to the validation below, which names every one.)
    let mut found = schema_errors(&document)
        .into_iter()
        .filter(|f| f.message.starts_with("invalid type"));
    if let Some(first) = found.next() {
        let message = format!("{}: {}", first.field, first.message);
        let more = located(yaml, found);
        return Err(match locate::locate(yaml, &first.field, false) {
            Some((line, column)) => ConfigError::Syntax {
                path: path.to_owned(),
                line,
                column,
                message,
                more,
            },
            None => ConfigError::SyntaxNoLocation {
                path: path.to_owned(),
                message,
                more,
            },
        });
    }
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let (policy, warnings) =
        validate_for(&parsed, base, purpose).map_err(|refused| ConfigError::Invalid {
            path: path.to_owned(),
            errors: refused.errors,
            files: refused.files,
        })?;
    let document = serde_json::to_value(document).unwrap_or_default();
    Ok(Loaded {
        policy,
        warnings,
        document,
        sha256: sha256_hex(bytes),
        loaded_at: SystemTime::now(),
        source: path.to_owned(),
    })
}

/// What the policy's JSON Schema finds wrong in a parsed YAML document: every unknown
/// field, unknown value of a fixed list, and value of the wrong type or range, at its
/// field path. Empty for every file the typed parse accepts.
pub fn schema_errors(document: &serde_yaml::Value) -> Vec<FieldError> {
    unknown::unknown_fields(&schema_value(), document)
}

/// `errors` with the `line:column` of each (an unknown field's key, another error's value),
/// as far as [`LOCATE_BUDGET_BYTES`] of scanning goes; the rest by field path alone.
fn located(yaml: &[u8], errors: impl Iterator<Item = FieldError>) -> Vec<LocatedError> {
    let mut budget = LOCATE_BUDGET_BYTES;
    errors
        .map(|error| {
            let at = budget.checked_sub(yaml.len()).and_then(|left| {
                budget = left;
                let key = error.message.starts_with("unknown field");
                locate::locate(yaml, &error.field, key)
            });
            LocatedError { at, error }
        })
        .collect()
}

/// Whether a map anywhere in `value` has a `<<` key.
fn has_merge_keys(value: &serde_yaml::Value) -> bool {
    match value {
        serde_yaml::Value::Mapping(map) => map
            .iter()
            .any(|(key, value)| key.as_str() == Some("<<") || has_merge_keys(value)),
        serde_yaml::Value::Sequence(items) => items.iter().any(has_merge_keys),
        serde_yaml::Value::Tagged(tagged) => has_merge_keys(&tagged.value),
        _ => false,
    }
}

/// The policy's JSON Schema (draft 2020-12) as `wsgate schema` prints it: pretty JSON and a
/// final newline. Generated by schemars from the structs the policy is parsed into
/// (`file::PolicyFile` and below), so it accepts what the parser accepts; the rules only
/// `validate` knows (CIDRs, Origin patterns, limits, key files) are not in it.
pub fn schema() -> String {
    let mut schema = schemars::schema_for!(file::PolicyFile);
    one_line_paragraphs(&mut schema);
    widths(&mut schema);
    // A schema is a JSON value: serializing it cannot fail.
    let mut text = serde_json::to_string_pretty(&schema).expect("a JSON value serializes");
    text.push('\n');
    text
}

/// The schema as a value to walk (see `unknown`).
fn schema_value() -> serde_json::Value {
    let mut schema = schemars::schema_for!(file::PolicyFile);
    widths(&mut schema);
    schema.to_value()
}

/// A whole number's width as bounds (`format: uint32` is also `maximum: 4294967295`), so
/// that an editor flags a value the gate cannot hold, and `check` names the limit of each
/// such value beside every other error rather than stopping at it.
fn widths(schema: &mut schemars::Schema) {
    let bounds: Option<(i64, u64)> = match schema.get("format").and_then(|f| f.as_str()) {
        Some("uint8") => Some((0, u8::MAX.into())),
        Some("uint16") => Some((0, u16::MAX.into())),
        Some("uint32") => Some((0, u32::MAX.into())),
        Some("uint64" | "uint") => Some((0, u64::MAX)),
        Some("int32") => Some((i32::MIN.into(), i32::MAX as u64)),
        Some("int64" | "int") => Some((i64::MIN, i64::MAX as u64)),
        _ => None,
    };
    if let Some((min, max)) = bounds.filter(|_| schema.get("const").is_none()) {
        if schema.get("minimum").is_none() {
            schema.insert("minimum".to_owned(), min.into());
        }
        if schema.get("maximum").is_none() {
            schema.insert("maximum".to_owned(), max.into());
        }
    }
    schemars::transform::transform_subschemas(&mut widths, schema);
}

/// The line and column (both from 1, the column in characters) of byte `at` of `text`,
/// whose bytes before `at` are UTF-8.
fn line_and_column(text: &[u8], at: usize) -> (usize, usize) {
    let before = String::from_utf8_lossy(&text[..at]);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// Whether serde's `message` ("routes[0]: unknown field `upstrem`, expected …", "mode:
/// unknown variant `enforcee`, …", "max_connections: invalid type: …") is the error about
/// `field` (`routes[0].upstrem`, `mode`, `max_connections`).
fn reported(message: &str, field: &str) -> bool {
    // The document itself of the wrong type (a list, a string) is the typed parse's first
    // error whatever else is wrong.
    if field.is_empty() {
        return true;
    }
    for what in ["unknown variant", "invalid type", "invalid value"] {
        if message.starts_with(&format!("{field}: {what}")) {
            return true;
        }
    }
    // The key may itself hold a `.` (`routes[0].a.b` is the key `a.b`), so every split
    // of the path is tried.
    message.starts_with(&format!("unknown field `{field}`"))
        || field.match_indices('.').any(|(at, _)| {
            let (parent, key) = (&field[..at], &field[at + 1..]);
            message.starts_with(&format!("{parent}: unknown field `{key}`"))
        })
}

/// Descriptions come from hard-wrapped doc comments; editors show them in hovers, where
/// those line breaks would only get in the way. Paragraph breaks are kept.
fn one_line_paragraphs(schema: &mut schemars::Schema) {
    if let Some(serde_json::Value::String(text)) = schema.get_mut("description") {
        let paragraphs: Vec<String> = text.split("\n\n").map(|p| p.replace('\n', " ")).collect();
        *text = paragraphs.join("\n\n");
    }
    schemars::transform::transform_subschemas(&mut one_line_paragraphs, schema);
}

/// The field path of the key a "duplicate entry" error names (`defaults.messages:
/// duplicate entry with key "burst"` is `defaults.messages.burst`), when it can be one.
fn repeated_key(message: &str) -> Option<String> {
    let (map, key) = match message.split_once(": duplicate entry with key \"") {
        Some((map, key)) => (Some(map), key),
        None => (None, message.strip_prefix("duplicate entry with key \"")?),
    };
    let key = key.strip_suffix('"')?;
    if key.is_empty() || key.contains(['"', '\\', '.', '[']) {
        return None;
    }
    Some(match map {
        Some(map) => format!("{map}.{key}"),
        None => key.to_owned(),
    })
}

/// serde_yaml appends " at line L column C" to its messages; we print the location first.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => in_words(&message[..i]),
        None => in_words(message),
    }
}

/// A parser message with the Rust type names it may hold (`expected struct RouteFile`,
/// `expected u32`) in the policy's words.
fn in_words(message: &str) -> String {
    // serde_yaml's numbers are 64 bits wide: past them the whole parse stops here.
    if message.contains(" as u128") || message.contains(" as i128") {
        return "a number past 64 bits (more than 18446744073709551615, or less than \
                -9223372036854775808): no field holds one; a claim value this large goes in \
                quotes, as text"
            .to_owned();
    }
    let mut out = message.to_owned();
    for (rust, words) in [
        (
            "struct PolicyFile",
            "a policy (a map with `version` and `routes`)",
        ),
        ("struct RouteFile", "a route (a map with `path`)"),
        (
            "struct KeyFile",
            "a key (a map such as `{public_key_file: ...}`)",
        ),
    ] {
        out = out.replace(rust, words);
    }
    // Any other section is a map of its fields.
    while let Some(at) = out.find("expected struct ") {
        let name_end = out[at + 16..]
            .find(|c: char| !c.is_ascii_alphanumeric())
            .map_or(out.len(), |n| at + 16 + n);
        out.replace_range(at + 9..name_end, "a map");
    }
    for (rust, words) in [
        ("expected u8", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected usize", "expected a whole number"),
        ("expected f64", "expected a number"),
    ] {
        if let Some(rest) = out.strip_suffix(rust) {
            out = format!("{rest}{words}");
        }
    }
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_url_in_a_message_has_its_user_information_hidden() {
        for (text, hidden) in [
            ("no url here", "no url here"),
            (
                "\"http://u:pw@h.example\" is not a CIDR",
                "\"http://***@h.example\" is not a CIDR",
            ),
            (
                "`redis://:pw@r:6379/0` and wss://a:b@c/d?e@f",
                "`redis://***@r:6379/0` and wss://***@c/d?e@f",
            ),
            ("https://h.example/a@b", "https://h.example/a@b"),
            ("x://@ y", "x://***@ y"),
        ] {
            assert_eq!(hide_userinfo_in(text), hidden);
        }
    }
}
