//! The data directory (`signet serve --data-dir`, `./signet-data/` by default): its files ([`DataPaths`]) and how
//! they are written: private files 0600 from the first byte, and files that are replaced while the appliance runs
//! (renewed credentials, the bundle) written aside and renamed over, so a reader never sees half a file. Also the
//! one reader of PEM certificate files ([`read_pem_certs`]) for the files signet is given (its own credentials, a
//! federation `ca`, an endpoint's chain), with one error type ([`PemFileError`]).

use std::path::{Path, PathBuf};

/// A file of the data directory could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct FileError {
    /// What was being done, with the path.
    pub what: String,
    /// The error.
    pub source: std::io::Error,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> FileError {
    move |source| FileError { what, source }
}

/// The files of the data directory.
#[derive(Debug, Clone)]
pub struct DataPaths {
    /// The directory.
    pub dir: PathBuf,
    /// The root certificate (PEM).
    pub root: PathBuf,
    /// The trust domain's roots for clients (PEM).
    pub bundle: PathBuf,
    /// The server's X509-SVID chain (PEM).
    pub server_cert: PathBuf,
    /// The server's key (PKCS#8 PEM, 0600).
    pub server_key: PathBuf,
    /// The admin client's X509-SVID chain (PEM).
    pub admin_cert: PathBuf,
    /// The admin client's key (PKCS#8 PEM, 0600).
    pub admin_key: PathBuf,
    /// The address the server listens on, written at start (for the CLI).
    pub endpoint: PathBuf,
    /// Below an offline root, before the first start: the authority's certificate and its chain up to (not
    /// including) the upstream root, as `signet rotate install --offline` checked and wrote it (PEM).
    pub authority: PathBuf,
    /// Below an offline root, before the first start: the authority's certificate signing request (PEM).
    pub authority_csr: PathBuf,
}

impl DataPaths {
    /// The layout under `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            root: dir.join("root.pem"),
            bundle: dir.join("bundle.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            admin_cert: dir.join("admin.pem"),
            admin_key: dir.join("admin.key"),
            endpoint: dir.join("endpoint"),
            authority: dir.join("authority.pem"),
            authority_csr: dir.join("authority.csr.pem"),
        }
    }
}
/// Writes a file only its owner can read (0600 on Unix).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), FileError> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(io(format!("writing {}", path.display())))?;
    f.write_all(data)
        .map_err(io(format!("writing {}", path.display())))
}

/// Writes a file anyone may read (as the umask allows).
pub fn write_public(path: &Path, data: &[u8]) -> Result<(), FileError> {
    std::fs::write(path, data).map_err(io(format!("writing {}", path.display())))
}

/// Replaces `path` with `data` atomically: written aside (0600 when `private`), then renamed over it.
pub fn replace_file(path: &Path, data: &[u8], private: bool) -> Result<(), FileError> {
    let aside = write_aside(path, data, private)?;
    rename_over(&aside, path)
}

/// Writes `data` next to `path` (`.<name>.new`, 0600 when `private`) and returns where.
pub fn write_aside(
    path: &Path,
    data: &[u8],
    private: bool,
) -> Result<std::path::PathBuf, FileError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let aside = path.with_file_name(format!(".{name}.new"));
    // A file left aside by a crash may have other permissions: start afresh.
    let _ = std::fs::remove_file(&aside);
    if private {
        write_private(&aside, data)?;
    } else {
        std::fs::write(&aside, data).map_err(|source| FileError {
            what: format!("writing {}", aside.display()),
            source,
        })?;
    }
    Ok(aside)
}

/// Renames a file written aside over `path`.
pub fn rename_over(aside: &Path, path: &Path) -> Result<(), FileError> {
    std::fs::rename(aside, path).map_err(|source| FileError {
        what: format!("replacing {}", path.display()),
        source,
    })
}

/// PEM of certificates, in order.
pub fn pem_certs(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
        .collect()
}

/// A PEM file could not be read, parsed, or holds no certificate where one is needed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemFileError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not PEM.
    #[error("{}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: pem::PemError,
    },
    /// The file holds no CERTIFICATE block.
    #[error("{} holds no CERTIFICATE", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
}

/// Every PEM block of the file `path`, in order.
pub fn read_pem(path: &Path) -> Result<Vec<pem::Pem>, PemFileError> {
    let text = std::fs::read(path).map_err(|source| PemFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    pem::parse_many(text).map_err(|source| PemFileError::Pem {
        path: path.to_path_buf(),
        source,
    })
}

/// The DER of every CERTIFICATE block of the PEM file `path`, in order (a chain: leaf first); at least one.
pub fn read_pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, PemFileError> {
    let certs: Vec<Vec<u8>> = read_pem(path)?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    if certs.is_empty() {
        return Err(PemFileError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}
