//! Where the control socket and the state directory are when the config
//! file does not say: places that fit the user who runs interlude (a systemd
//! service, root, or anyone else). The daemon and the client commands both
//! ask here, so `interlude status` finds a daemon its own user started with
//! no flags. Also the creation of those directories (mode 0750) and the
//! ownership check of the shared-`/tmp` fallback.
//!
//! The choice itself is a pure function of an [`Environment`], so every
//! branch is tested without touching the process environment.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::schema::DEFAULT_CONTROL_SOCKET;

/// The state directory of a daemon run by root outside systemd.
pub const ROOT_STATE_DIR: &str = "/var/lib/interlude";
/// Mode of the directories interlude creates (before the umask).
pub const DIR_MODE: u32 = 0o750;

const SOCKET_NAME: &str = "control.sock";

/// What the defaults depend on: the effective user and a few variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    pub uid: u32,
    /// systemd's `RuntimeDirectory=` (colon-separated if several).
    pub runtime_directory: Option<OsString>,
    pub xdg_runtime_dir: Option<OsString>,
    /// systemd's `StateDirectory=` (colon-separated if several).
    pub state_directory: Option<OsString>,
    pub xdg_state_home: Option<OsString>,
    pub home: Option<OsString>,
}

impl Environment {
    /// The environment of this process.
    pub fn current() -> Environment {
        Environment {
            uid: effective_uid(),
            runtime_directory: std::env::var_os("RUNTIME_DIRECTORY"),
            xdg_runtime_dir: std::env::var_os("XDG_RUNTIME_DIR"),
            state_directory: std::env::var_os("STATE_DIRECTORY"),
            xdg_state_home: std::env::var_os("XDG_STATE_HOME"),
            home: std::env::var_os("HOME"),
        }
    }
}

pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The default control socket: `$RUNTIME_DIRECTORY/control.sock` under
/// systemd, `/run/interlude/control.sock` as root, else
/// `$XDG_RUNTIME_DIR/interlude/control.sock`, else
/// `/tmp/interlude-UID/control.sock`.
pub fn default_control_socket(env: &Environment) -> PathBuf {
    if let Some(dir) = first_absolute(env.runtime_directory.as_deref()) {
        return dir.join(SOCKET_NAME);
    }
    if env.uid == 0 {
        return PathBuf::from(DEFAULT_CONTROL_SOCKET);
    }
    if let Some(dir) = absolute(env.xdg_runtime_dir.as_deref()) {
        return dir.join("interlude").join(SOCKET_NAME);
    }
    tmp_fallback_dir(env.uid).join(SOCKET_NAME)
}

/// Where a client command looks for the daemon when neither the command
/// line nor the config says: the user's own default socket, then the
/// system one, so that a member of the group `interlude` reaches the
/// packaged service too. The first that exists wins; with none, the user's
/// own (the error then names it).
pub fn client_control_socket(env: &Environment, exists: impl Fn(&Path) -> bool) -> PathBuf {
    let own = default_control_socket(env);
    let system = PathBuf::from(DEFAULT_CONTROL_SOCKET);
    if !exists(&own) && exists(&system) {
        system
    } else {
        own
    }
}

/// The state directory: the config's `state_dir`, else systemd's
/// `$STATE_DIRECTORY`, else `/var/lib/interlude` as root, else
/// `$XDG_STATE_HOME/interlude`, else `~/.local/state/interlude` (and with no
/// home at all, `/tmp/interlude-UID/state`).
pub fn state_dir(configured: Option<&Path>, env: &Environment) -> PathBuf {
    if let Some(dir) = configured {
        return dir.to_path_buf();
    }
    if let Some(dir) = first_absolute(env.state_directory.as_deref()) {
        return dir;
    }
    if env.uid == 0 {
        return PathBuf::from(ROOT_STATE_DIR);
    }
    if let Some(dir) = absolute(env.xdg_state_home.as_deref()) {
        return dir.join("interlude");
    }
    if let Some(home) = absolute(env.home.as_deref()) {
        return home.join(".local/state/interlude");
    }
    tmp_fallback_dir(env.uid).join("state")
}

/// The last resort for a user with no runtime directory: in the shared
/// `/tmp`, so it must be checked with [`check_private_dir`] before use.
pub fn tmp_fallback_dir(uid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/interlude-{uid}"))
}

/// The first absolute path of a colon-separated list (systemd passes one per
/// configured directory).
fn first_absolute(list: Option<&OsStr>) -> Option<PathBuf> {
    let list = list?.to_str()?;
    list.split(':')
        .map(Path::new)
        .find(|p| p.is_absolute())
        .map(Path::to_path_buf)
}

/// The XDG base directory rule: a relative or empty value is ignored.
fn absolute(value: Option<&OsStr>) -> Option<PathBuf> {
    let path = Path::new(value?);
    path.is_absolute().then(|| path.to_path_buf())
}

/// A directory that cannot be made or used. `Display` names the path and
/// the cause.
#[derive(Debug)]
pub enum DirError {
    NotADirectory(PathBuf),
    Create {
        path: PathBuf,
        error: io::Error,
    },
    Inspect {
        path: PathBuf,
        error: io::Error,
    },
    /// The shared-`/tmp` fallback is not a real directory.
    NotARealDirectory(PathBuf),
    OwnedByOther {
        path: PathBuf,
        owner: u32,
        uid: u32,
    },
    WritableByOthers {
        path: PathBuf,
        mode: u32,
    },
    NotWritable {
        path: PathBuf,
        error: io::Error,
    },
}

impl std::fmt::Display for DirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirError::NotADirectory(path) => write!(f, "{} is not a directory", path.display()),
            DirError::Create { path, error } => {
                write!(f, "cannot create directory {}: {error}", path.display())
            }
            DirError::Inspect { path, error } => write!(f, "{}: {error}", path.display()),
            DirError::NotARealDirectory(path) => {
                write!(f, "{} is not a directory (refusing to use it)", path.display())
            }
            DirError::OwnedByOther { path, owner, uid } => write!(
                f,
                "{} is owned by uid {owner}, not by this user (uid {uid}): refusing to use it",
                path.display()
            ),
            DirError::WritableByOthers { path, mode } => write!(
                f,
                "{} is writable by others (mode {mode:o}): refusing to use it",
                path.display()
            ),
            DirError::NotWritable { path, error } => write!(f, "cannot write in {}: {error}", path.display()),
        }
    }
}

impl std::error::Error for DirError {}

/// Creates `dir` and its missing parents with [`DIR_MODE`]; returns the
/// directories it created, outermost first, so a caller can undo it.
pub fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>, DirError> {
    let mut missing = Vec::new();
    let mut current = dir;
    loop {
        match std::fs::metadata(current) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => return Err(DirError::NotADirectory(current.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(current.to_path_buf()),
            Err(error) => {
                return Err(DirError::Create {
                    path: dir.to_path_buf(),
                    error,
                });
            }
        }
        match current.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => current = parent,
            _ => break,
        }
    }
    missing.reverse();
    let mut created = Vec::with_capacity(missing.len());
    for path in missing {
        match std::fs::DirBuilder::new().mode(DIR_MODE).create(&path) {
            Ok(()) => created.push(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(error) => {
                remove_created(&created);
                return Err(DirError::Create { path, error });
            }
        }
    }
    Ok(created)
}

/// Removes what [`create_dirs`] created (innermost first), as far as they
/// are still empty.
pub fn remove_created(created: &[PathBuf]) {
    for dir in created.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// A directory in a place anyone may write to (`/tmp`) is only trusted if
/// it is a real directory owned by `uid` that no one else may write to:
/// otherwise another user could have put it there to catch the socket.
pub fn check_private_dir(dir: &Path, uid: u32) -> Result<(), DirError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|error| DirError::Inspect {
        path: dir.to_path_buf(),
        error,
    })?;
    if !meta.is_dir() {
        return Err(DirError::NotARealDirectory(dir.to_path_buf()));
    }
    if meta.uid() != uid {
        return Err(DirError::OwnedByOther {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(DirError::WritableByOthers {
            path: dir.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Makes the directory a UNIX control socket at `socket` lives in: created
/// if missing, and checked when it is the shared-`/tmp` fallback.
pub fn prepare_socket_dir(socket: &Path) -> Result<(), DirError> {
    let Some(dir) = socket.parent() else {
        return Ok(());
    };
    create_dirs(dir)?;
    let uid = effective_uid();
    if dir == tmp_fallback_dir(uid) {
        check_private_dir(dir, uid)?;
    }
    Ok(())
}

/// Checks that the daemon can keep its state in `dir`: creates it if
/// missing, then creates and removes a probe file in it. With `keep: false`
/// (for `interlude check`) the directories it created are removed again.
pub fn probe_writable_dir(dir: &Path, keep: bool) -> Result<(), DirError> {
    let created = create_dirs(dir)?;
    let probe = dir.join(format!(".interlude-probe.{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map(|_| ())
        .map_err(|error| DirError::NotWritable {
            path: dir.to_path_buf(),
            error,
        });
    if written.is_ok() {
        let _ = std::fs::remove_file(&probe);
    }
    if !keep || written.is_err() {
        remove_created(&created);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32) -> Environment {
        Environment {
            uid,
            home: Some("/home/ann".into()),
            ..Environment::default()
        }
    }

    #[test]
    fn control_socket_default_for_each_kind_of_user() {
        let mut env = user(0);
        assert_eq!(
            default_control_socket(&env),
            Path::new("/run/interlude/control.sock")
        );
        env.xdg_runtime_dir = Some("/run/user/0".into());
        assert_eq!(
            default_control_socket(&env),
            Path::new("/run/interlude/control.sock")
        );
        env.runtime_directory = Some("/run/interlude-a:/run/b".into());
        assert_eq!(
            default_control_socket(&env),
            Path::new("/run/interlude-a/control.sock")
        );

        let mut env = user(1000);
        assert_eq!(
            default_control_socket(&env),
            Path::new("/tmp/interlude-1000/control.sock")
        );
        env.xdg_runtime_dir = Some("relative/dir".into());
        assert_eq!(
            default_control_socket(&env),
            Path::new("/tmp/interlude-1000/control.sock")
        );
        env.xdg_runtime_dir = Some("/run/user/1000".into());
        assert_eq!(
            default_control_socket(&env),
            Path::new("/run/user/1000/interlude/control.sock")
        );
        env.runtime_directory = Some("/run/svc".into());
        assert_eq!(default_control_socket(&env), Path::new("/run/svc/control.sock"));
        env.runtime_directory = Some("".into());
        assert_eq!(
            default_control_socket(&env),
            Path::new("/run/user/1000/interlude/control.sock")
        );
    }

    #[test]
    fn a_client_falls_back_to_the_system_socket() {
        let mut env = user(1000);
        env.xdg_runtime_dir = Some("/run/user/1000".into());
        let own = Path::new("/run/user/1000/interlude/control.sock");
        let system = Path::new("/run/interlude/control.sock");
        assert_eq!(client_control_socket(&env, |_| true), own);
        assert_eq!(client_control_socket(&env, |_| false), own);
        assert_eq!(client_control_socket(&env, |p| p == system), system);
        assert_eq!(client_control_socket(&env, |p| p == own), own);
    }

    #[test]
    fn state_dir_default_for_each_kind_of_user() {
        let configured = Some(Path::new("/srv/x"));
        let mut env = user(0);
        env.state_directory = Some("/var/lib/a:/var/lib/b".into());
        assert_eq!(state_dir(configured, &env), Path::new("/srv/x"));
        assert_eq!(state_dir(None, &env), Path::new("/var/lib/a"));
        env.state_directory = Some(":/var/lib/b".into());
        assert_eq!(state_dir(None, &env), Path::new("/var/lib/b"));
        env.state_directory = Some("".into());
        assert_eq!(state_dir(None, &env), Path::new("/var/lib/interlude"));
        env.state_directory = None;
        env.xdg_state_home = Some("/home/root/.state".into());
        assert_eq!(state_dir(None, &env), Path::new("/var/lib/interlude"));

        let mut env = user(1000);
        assert_eq!(
            state_dir(None, &env),
            Path::new("/home/ann/.local/state/interlude")
        );
        env.xdg_state_home = Some("/home/ann/st".into());
        assert_eq!(state_dir(None, &env), Path::new("/home/ann/st/interlude"));
        env.xdg_state_home = Some("st".into());
        assert_eq!(
            state_dir(None, &env),
            Path::new("/home/ann/.local/state/interlude")
        );
        env.state_directory = Some("/var/lib/svc".into());
        assert_eq!(state_dir(None, &env), Path::new("/var/lib/svc"));
        assert_eq!(state_dir(configured, &env), Path::new("/srv/x"));
        let homeless = Environment {
            uid: 1000,
            ..Environment::default()
        };
        assert_eq!(state_dir(None, &homeless), Path::new("/tmp/interlude-1000/state"));
    }

    #[test]
    fn directories_are_created_0750_and_can_be_undone() {
        use std::os::unix::fs::PermissionsExt;
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("a/b/c");
        let created = create_dirs(&dir).unwrap();
        assert_eq!(created.len(), 3);
        assert_eq!(created[0], top.path().join("a"));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o750, 0, "mode {mode:o}");
        assert!(create_dirs(&dir).unwrap().is_empty());
        remove_created(&created);
        assert!(!top.path().join("a").exists());

        probe_writable_dir(&dir, false).unwrap();
        assert!(!top.path().join("a").exists(), "check leaves nothing behind");
        probe_writable_dir(&dir, true).unwrap();
        assert!(dir.is_dir());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

        // Under a regular file: fails for root too.
        std::fs::write(top.path().join("file"), "").unwrap();
        let error = probe_writable_dir(&top.path().join("file/sub"), false)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("file/sub") && error.contains("Not a directory"),
            "{error}"
        );
    }

    #[test]
    fn a_shared_tmp_directory_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let uid = effective_uid();
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        check_private_dir(&dir, uid).unwrap();
        let error = check_private_dir(&dir, uid + 1).unwrap_err().to_string();
        assert!(error.contains("owned by uid"), "{error}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            check_private_dir(&dir, uid)
                .unwrap_err()
                .to_string()
                .contains("writable by others")
        );
        let link = top.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(
            check_private_dir(&link, uid)
                .unwrap_err()
                .to_string()
                .contains("not a directory")
        );
    }
}
