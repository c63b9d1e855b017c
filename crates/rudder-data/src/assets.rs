//! Named assets (datasets, models) and their fetcher. The manifest (`assets.toml`, compiled in)
//! lists for each asset several sources: a PyPI wheel (package, version, member path inside the
//! wheel) and its usual home on the web. A fetch stages files in a temporary folder next to the
//! cache, verifies sizes and SHA-256, writes a marker, and only then renames the folder into
//! place, so the cache never holds a half-written asset.

use crate::error::{DataError, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

const MANIFEST: &str = include_str!("../assets.toml");
const MARKER: &str = ".rudder-asset.json";

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct FileSpec {
    pub path: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    Pypi {
        package: String,
        version: String,
        member: String,
        format: String,
        files: Vec<FileSpec>,
        note: Option<String>,
    },
    Http {
        url: String,
        archive: Option<String>,
        member: Option<String>,
        format: String,
        files: Vec<FileSpec>,
    },
}

impl Source {
    pub fn label(&self) -> String {
        match self {
            Source::Pypi {
                package, version, ..
            } => format!("pypi:{package}=={version}"),
            Source::Http { url, .. } => url.clone(),
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Pypi { .. } => "pypi",
            Source::Http { .. } => "hub",
        }
    }
    pub fn files(&self) -> &[FileSpec] {
        match self {
            Source::Pypi { files, .. } | Source::Http { files, .. } => files,
        }
    }
    pub fn format(&self) -> &str {
        match self {
            Source::Pypi { format, .. } | Source::Http { format, .. } => format,
        }
    }
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct AssetSpec {
    pub name: String,
    pub kind: String,
    pub description: String,
    pub licence: String,
    #[serde(rename = "source")]
    pub sources: Vec<Source>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Manifest {
    #[serde(rename = "asset")]
    pub assets: Vec<AssetSpec>,
}

impl Manifest {
    /// The manifest compiled into rudder.
    pub fn builtin() -> Manifest {
        toml::from_str(MANIFEST).expect("assets.toml is valid (checked by a test)")
    }
    pub fn get(&self, name: &str) -> Option<&AssetSpec> {
        self.assets.iter().find(|a| a.name == name)
    }
    pub fn names(&self) -> Vec<&str> {
        self.assets.iter().map(|a| a.name.as_str()).collect()
    }
}

/// What a completed fetch records next to the files.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Marker {
    pub name: String,
    pub source: String,
    pub format: String,
    pub files: Vec<FileSpec>,
    pub fetched_unix: u64,
}

/// Which source to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePref {
    /// Each source in manifest order until one succeeds.
    Auto,
    Pypi,
    Hub,
}

#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// A local folder holding the wheel (`pip download` output) or the files themselves.
    pub from: Option<PathBuf>,
    pub source: SourcePref,
    /// Fetch again even when the asset is present.
    pub force: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            from: None,
            source: SourcePref::Auto,
            force: false,
        }
    }
}

/// The asset cache.
#[derive(Debug, Clone)]
pub struct Store {
    pub root: PathBuf,
}

impl Store {
    /// The one asset cache: `$RUDDER_HOME`, else `$XDG_CACHE_HOME/rudder`, else
    /// `~/.cache/rudder` (the same rule on Linux and macOS, so the shell scripts, which spell it
    /// the same way, and the binary always agree), else the platform's cache folder.
    pub fn from_env() -> Store {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let root = var("RUDDER_HOME")
            .or_else(|| {
                var("XDG_CACHE_HOME")
                    .filter(|p| p.is_absolute())
                    .map(|p| p.join("rudder"))
            })
            .or_else(|| {
                (cfg!(unix))
                    .then(|| var("HOME").map(|h| h.join(".cache").join("rudder")))
                    .flatten()
            })
            .unwrap_or_else(|| {
                dirs::cache_dir()
                    .unwrap_or_else(std::env::temp_dir)
                    .join("rudder")
            });
        Store { root }
    }

    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    pub fn asset_dir(&self, name: &str) -> PathBuf {
        self.root.join("assets").join(name)
    }

    /// The marker of a fetched asset, if present and readable.
    pub fn marker(&self, name: &str) -> Option<Marker> {
        let p = self.asset_dir(name).join(MARKER);
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    }

    /// Folder of a fetched asset, or an error telling how to fetch it.
    pub fn require(&self, name: &str) -> Result<PathBuf> {
        match self.marker(name) {
            Some(_) => Ok(self.asset_dir(name)),
            None => Err(DataError::asset(
                name,
                format!(
                    "not fetched into {} (run `rudder assets fetch {name}`)",
                    self.root.join("assets").display()
                ),
            )),
        }
    }

    /// Fetch an asset (no-op when present unless `force`). `log` receives progress lines.
    pub fn fetch(
        &self,
        spec: &AssetSpec,
        opts: &FetchOptions,
        log: &mut dyn FnMut(&str),
    ) -> Result<PathBuf> {
        let dest = self.asset_dir(&spec.name);
        if !opts.force && self.marker(&spec.name).is_some() {
            log(&format!("{} is already in {}", spec.name, dest.display()));
            return Ok(dest);
        }
        let candidates: Vec<&Source> = spec
            .sources
            .iter()
            .filter(|s| match opts.source {
                SourcePref::Auto => true,
                SourcePref::Pypi => s.kind() == "pypi",
                SourcePref::Hub => s.kind() == "hub",
            })
            .collect();
        if candidates.is_empty() {
            return Err(DataError::asset(
                &spec.name,
                "no source of the requested kind",
            ));
        }
        let parent = self.root.join("assets");
        std::fs::create_dir_all(&parent).map_err(|e| DataError::io(&parent, e))?;
        let mut errors = Vec::new();
        for src in candidates {
            let staging = parent.join(format!(".staging-{}-{}", spec.name, std::process::id()));
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging).map_err(|e| DataError::io(&staging, e))?;
            log(&format!("fetching {} from {}", spec.name, src.label()));
            let r = obtain(src, opts.from.as_deref(), &staging, log).and_then(|files| {
                let marker = Marker {
                    name: spec.name.clone(),
                    source: src.label(),
                    format: src.format().to_string(),
                    files,
                    fetched_unix: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                };
                let mp = staging.join(MARKER);
                std::fs::write(&mp, serde_json::to_vec_pretty(&marker).unwrap())
                    .map_err(|e| DataError::io(&mp, e))?;
                install(&staging, &dest)
            });
            match r {
                Ok(()) => {
                    log(&format!("{} ready in {}", spec.name, dest.display()));
                    return Ok(dest);
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&staging);
                    log(&format!("  failed: {e}"));
                    errors.push(format!("{}: {e}", src.label()));
                }
            }
        }
        Err(DataError::asset(
            &spec.name,
            format!("every source failed:\n  {}", errors.join("\n  ")),
        ))
    }
}

/// Move a complete staging folder into place, replacing any previous copy.
fn install(staging: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        let old = dest.with_file_name(format!(
            ".old-{}-{}",
            dest.file_name().unwrap().to_string_lossy(),
            std::process::id()
        ));
        std::fs::rename(dest, &old).map_err(|e| DataError::io(dest, e))?;
        std::fs::rename(staging, dest).map_err(|e| DataError::io(dest, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(staging, dest).map_err(|e| DataError::io(dest, e))?;
    }
    Ok(())
}

/// Copy `r` into `path` while hashing; returns (size, hex sha256).
fn copy_hashed(mut r: impl Read, path: &Path) -> Result<(u64, String)> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| DataError::io(p, e))?;
    }
    let mut f = std::fs::File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        f.write_all(&buf[..k]).map_err(|e| DataError::io(path, e))?;
        n += k as u64;
    }
    f.sync_all().map_err(|e| DataError::io(path, e))?;
    Ok((n, format!("{:x}", h.finalize())))
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| DataError::io(path, e))?;
    Ok(format!("{:x}", h.finalize()))
}

fn verify(spec: &FileSpec, size: u64, sha: &str, log: &mut dyn FnMut(&str)) -> Result<FileSpec> {
    if let Some(s) = spec.size
        && s != size
    {
        return Err(DataError::Config(format!(
            "{}: size {size} bytes, expected {s}",
            spec.path
        )));
    }
    match &spec.sha256 {
        Some(want) if want != sha => {
            return Err(DataError::Config(format!(
                "{}: SHA-256 {sha} does not match the pinned {want}",
                spec.path
            )));
        }
        Some(_) => {}
        None => log(&format!(
            "  note: {} has no pinned checksum; recorded {sha}",
            spec.path
        )),
    }
    Ok(FileSpec {
        path: spec.path.clone(),
        size: Some(size),
        sha256: Some(sha.to_string()),
    })
}

fn obtain(
    src: &Source,
    from: Option<&Path>,
    staging: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<FileSpec>> {
    // A local folder may hold the files themselves.
    if let Some(dir) = from
        && src.files().iter().all(|f| dir.join(&f.path).is_file())
    {
        log(&format!("  copying from {}", dir.display()));
        return src
            .files()
            .iter()
            .map(|f| {
                let p = dir.join(&f.path);
                let r = std::fs::File::open(&p).map_err(|e| DataError::io(&p, e))?;
                let (n, sha) = copy_hashed(r, &staging.join(&f.path))?;
                verify(f, n, &sha, log)
            })
            .collect();
    }
    match src {
        Source::Pypi {
            package,
            version,
            member,
            files,
            ..
        } => {
            let wheel = match from.and_then(|d| find_wheel(d, package, version)) {
                Some(w) => w,
                None if from.is_some() => {
                    return Err(DataError::Config(format!(
                        "{} holds neither the files nor a {package}=={version} wheel",
                        from.unwrap().display()
                    )));
                }
                None => pip_download(package, version, staging, log)?,
            };
            let r = extract_zip(&wheel, member, files, staging, log);
            if wheel.starts_with(staging) {
                let _ = std::fs::remove_dir_all(wheel.parent().unwrap());
            }
            r
        }
        Source::Http {
            url,
            archive,
            member,
            files,
            ..
        } => {
            if from.is_some() {
                return Err(DataError::Config(
                    "--from folder does not hold the files".into(),
                ));
            }
            let client = reqwest::blocking::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(15))
                .timeout(std::time::Duration::from_secs(3600))
                .build()
                .map_err(|e| DataError::Config(format!("HTTP client: {e}")))?;
            let get = |u: &str| -> Result<reqwest::blocking::Response> {
                let resp = client
                    .get(u)
                    .send()
                    .map_err(|e| DataError::Config(format!("GET {u}: {e}")))?;
                if !resp.status().is_success() {
                    return Err(DataError::Config(format!(
                        "GET {u}: HTTP {}",
                        resp.status()
                    )));
                }
                Ok(resp)
            };
            match archive.as_deref() {
                Some("zip") => {
                    log(&format!("  downloading {url}"));
                    let tmp = staging.join(".download.zip");
                    copy_hashed(get(url)?, &tmp)?;
                    let r = extract_zip(&tmp, member.as_deref().unwrap_or(""), files, staging, log);
                    let _ = std::fs::remove_file(&tmp);
                    r
                }
                Some(other) => Err(DataError::Config(format!(
                    "unsupported archive kind `{other}`"
                ))),
                None => files
                    .iter()
                    .map(|f| {
                        let u = url.replace("{path}", &f.path);
                        log(&format!("  downloading {u}"));
                        let (n, sha) = copy_hashed(get(&u)?, &staging.join(&f.path))?;
                        verify(f, n, &sha, log)
                    })
                    .collect(),
            }
        }
    }
}

fn wheel_prefix(package: &str, version: &str) -> String {
    format!(
        "{}-{version}-",
        package.to_lowercase().replace(['-', '.'], "_")
    )
}

fn find_wheel(dir: &Path, package: &str, version: &str) -> Option<PathBuf> {
    let prefix = wheel_prefix(package, version);
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            n.starts_with(&prefix) && n.ends_with(".whl")
        })
        .collect();
    found.sort();
    found.pop()
}

/// `python3 -m pip download --no-deps --only-binary=:all: package==version` into a temp folder.
fn pip_download(
    package: &str,
    version: &str,
    staging: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let dl = staging.join(".pip");
    std::fs::create_dir_all(&dl).map_err(|e| DataError::io(&dl, e))?;
    let spec = format!("{package}=={version}");
    log(&format!("  pip download --no-deps {spec}"));
    let mut last_err = String::new();
    for (prog, pre) in [
        ("python3", vec!["-m", "pip"]),
        ("pip3", vec![]),
        ("pip", vec![]),
    ] {
        let out = Command::new(prog)
            .args(&pre)
            .args([
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
            ])
            .arg(&dl)
            .arg(&spec)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                return find_wheel(&dl, package, version).ok_or_else(|| {
                    DataError::Config(format!(
                        "pip reported success but no {spec} wheel is in {}",
                        dl.display()
                    ))
                });
            }
            Ok(o) => {
                last_err = format!("{prog}: {}", String::from_utf8_lossy(&o.stderr).trim());
                break; // pip ran and failed: another pip would fail the same way
            }
            Err(e) => last_err = format!("{prog}: {e}"),
        }
    }
    Err(DataError::Config(format!(
        "could not download {spec} with pip ({last_err})"
    )))
}

/// Extract `files` (paths relative to `member`) from a zip archive into `staging`, verifying.
fn extract_zip(
    zip_path: &Path,
    member: &str,
    files: &[FileSpec],
    staging: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<FileSpec>> {
    let f = std::fs::File::open(zip_path).map_err(|e| DataError::io(zip_path, e))?;
    let mut z = zip::ZipArchive::new(f)
        .map_err(|e| DataError::invalid(zip_path, format!("not a valid zip/wheel: {e}")))?;
    let mut out = Vec::new();
    for spec in files {
        let name = format!("{member}{}", spec.path);
        let entry = z
            .by_name(&name)
            .map_err(|_| DataError::invalid(zip_path, format!("has no member `{name}`")))?;
        let (n, sha) = copy_hashed(entry, &staging.join(&spec.path))?;
        out.push(verify(spec, n, &sha, log)?);
    }
    Ok(out)
}

/// A model argument: an existing file or folder, or the name of a fetched asset.
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    let p = Path::new(arg);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let manifest = Manifest::builtin();
    if manifest.get(arg).is_some() {
        return Store::from_env().require(arg);
    }
    Err(DataError::Config(format!(
        "`{arg}` is neither an existing model file or folder nor a known asset ({})",
        manifest.names().join(", ")
    )))
}

/// For integration tests: the folder of a fetched asset, or `None` with a "skipped" message —
/// unless `RUDDER_REQUIRE_ASSETS=1` (CI), where an absent asset is a failure.
#[doc(hidden)]
pub fn for_tests(name: &str) -> Option<PathBuf> {
    match Store::from_env().require(name) {
        Ok(p) => Some(p),
        Err(e) => {
            if std::env::var("RUDDER_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
                panic!("required asset {name} is absent: {e}");
            }
            eprintln!("skipped: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_parses_and_names_required_assets() {
        let m = Manifest::builtin();
        for n in [
            "ml-100k",
            "ml-1m",
            "smollm2-135m-instruct",
            "all-minilm-l6-v2",
        ] {
            let a = m.get(n).unwrap();
            assert!(
                a.sources.iter().any(|s| s.kind() == "pypi"),
                "{n} has a PyPI mirror"
            );
            assert!(
                a.sources.iter().any(|s| s.kind() == "hub"),
                "{n} has its usual home"
            );
            let pypi = a.sources.iter().find(|s| s.kind() == "pypi").unwrap();
            assert!(
                pypi.files()
                    .iter()
                    .all(|f| f.sha256.as_ref().is_some_and(|h| h.len() == 64))
            );
        }
    }

    fn fake_wheel(dir: &Path, content: &[u8]) -> PathBuf {
        let p = dir.join("demo_pkg-1.0-py3-none-any.whl");
        let f = std::fs::File::create(&p).unwrap();
        let mut z = zip::ZipWriter::new(f);
        z.start_file(
            "demo_pkg/data/a.txt",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        z.write_all(content).unwrap();
        z.finish().unwrap();
        p
    }

    fn spec(sha: &str) -> AssetSpec {
        AssetSpec {
            name: "demo".into(),
            kind: "dataset".into(),
            description: String::new(),
            licence: String::new(),
            sources: vec![Source::Pypi {
                package: "demo-pkg".into(),
                version: "1.0".into(),
                member: "demo_pkg/data/".into(),
                format: "atomic".into(),
                note: None,
                files: vec![FileSpec {
                    path: "a.txt".into(),
                    size: Some(5),
                    sha256: Some(sha.into()),
                }],
            }],
        }
    }

    #[test]
    fn fetch_from_local_wheel_verifies_and_is_atomic() {
        let tmp = tempfile::tempdir().unwrap();
        let wheels = tmp.path().join("wheels");
        std::fs::create_dir_all(&wheels).unwrap();
        fake_wheel(&wheels, b"hello");
        let good = format!("{:x}", Sha256::digest(b"hello"));
        let store = Store::new(tmp.path().join("home"));
        let opts = FetchOptions {
            from: Some(wheels.clone()),
            ..Default::default()
        };
        // a wrong checksum fails and leaves nothing behind
        let bad = spec(&"0".repeat(64));
        assert!(store.fetch(&bad, &opts, &mut |_| {}).is_err());
        assert!(store.marker("demo").is_none());
        assert!(!store.asset_dir("demo").exists());
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("home/assets"))
            .unwrap()
            .collect();
        assert!(leftovers.is_empty());
        // the right one lands with a marker
        let dir = store.fetch(&spec(&good), &opts, &mut |_| {}).unwrap();
        assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"hello");
        assert_eq!(
            store.marker("demo").unwrap().files[0].sha256.as_deref(),
            Some(good.as_str())
        );
        // a failed re-fetch keeps the good copy
        let opts_force = FetchOptions {
            force: true,
            ..opts
        };
        assert!(store.fetch(&bad, &opts_force, &mut |_| {}).is_err());
        assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"hello");
    }
}
