//! The binary under test as a file an upgrade replaces: a test runs the
//! daemon from a copy in its own directory, then replaces that file the way
//! dpkg does (a new file renamed over it; the running process keeps the
//! old, now deleted, inode) before asking for `upgrade`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Copies the binary under test into `dir`; returns the copy's path.
pub fn install(dir: &Path) -> PathBuf {
    let program = dir.join("interlude");
    fs::copy(super::binary(), &program).expect("copy the binary");
    program
}

/// Replaces `program` with `contents`, renamed over it.
pub fn replace_with(program: &Path, contents: &[u8]) {
    let staged = program.with_extension("dpkg-new");
    fs::write(&staged, contents).expect("write the new binary");
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::rename(&staged, program).expect("rename over the old binary");
}

/// Replaces `program` with the binary under test.
pub fn replace_with_binary(program: &Path) {
    replace_with(program, &fs::read(super::binary()).expect("read the binary"));
}

/// Replaces `program` with a script that starts the binary under test on
/// a config of its own, `yaml` written to `dir/next/interlude.yaml`: the
/// new process reads it while the old one's file, and so its reloads, stay
/// as they are. Returns the new config's path.
pub fn replace_with_binary_on(program: &Path, dir: &Path, yaml: &str) -> PathBuf {
    let next_dir = dir.join("next");
    fs::create_dir_all(&next_dir).expect("mkdir next");
    let next = super::write_config(&next_dir, yaml);
    let script = format!(
        "#!/bin/sh\nexec {} run -c {}\n",
        super::binary().display(),
        next.display()
    );
    replace_with(program, script.as_bytes());
    next
}
