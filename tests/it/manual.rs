//! Keeps the manual pages true to the code.
//!
//! * `man/interlude.8`: every command listed by `interlude --help` has an
//!   `.It Cm NAME` entry; every option of `interlude --help` and of each
//!   `interlude COMMAND --help` (the real binary) appears as an `Fl` flag;
//!   each command's SYNOPSIS block names that command's own options (those
//!   that are not also top-level ones); every `[env: NAME]` of the help has
//!   an `.It Ev NAME` entry.
//! * `man/interlude.yaml.5`: every config key has an `.It Cm KEY` entry and
//!   appears in the page's full example, and the example passes
//!   `interlude check`; every key also appears in the shipped example
//!   config `etc/interlude/interlude.yaml` (commented out or not), which
//!   passes `interlude check` too.
//!
//! Where the keys come from: `interlude::config::keys::all()`, which reads
//! them off the schema's serde definitions (the field lists serde derives,
//! renames applied), so a new field in any config struct makes this test
//! fail until both pages document it. A walk that finds too little fails on
//! its own, so a refactor cannot make this test pass vacuously.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Runs the real binary; returns its standard output, asserting success.
fn interlude(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_interlude"))
        .args(args)
        .env_remove("INTERLUDE_CONFIG")
        .env_remove("INTERLUDE_TOKEN")
        .output()
        .expect("run interlude");
    assert!(
        output.status.success(),
        "interlude {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("help is UTF-8")
}

/// What one `--help` lists.
#[derive(Debug, Default)]
struct Help {
    commands: Vec<String>,
    /// `-c`, `--config`, ...
    options: BTreeSet<String>,
    /// `INTERLUDE_CONFIG`, ...
    env: BTreeSet<String>,
}

fn parse_help(text: &str) -> Help {
    let mut help = Help::default();
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line.trim_end_matches(':');
            continue;
        }
        let trimmed = line.trim_start();
        match section {
            "Commands" => {
                if let Some(name) = trimmed.split_whitespace().next() {
                    help.commands.push(name.to_string());
                }
            }
            "Options" if trimmed.starts_with('-') => {
                // "-c, --config <FILE>  Configuration file ...": flags, then
                // value names, then the description.
                for token in trimmed.split_whitespace() {
                    let token = token.trim_end_matches(',');
                    if token.starts_with('-') {
                        help.options.insert(token.to_string());
                    } else if !token.starts_with('<') {
                        break;
                    }
                }
            }
            _ => {}
        }
        let mut rest = line;
        while let Some(at) = rest.find("[env: ") {
            rest = &rest[at + "[env: ".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            help.env.insert(name);
        }
    }
    help
}

fn is_macro(token: &str) -> bool {
    let mut chars = token.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && (2..=3).contains(&token.len())
        && chars.all(|c| c.is_ascii_lowercase())
}

/// The flags an mdoc source shows: `.Fl c Ar file , Fl -config` gives `-c`
/// and `--config`; `.Fl h | -help` gives `-h` and `--help`.
fn mdoc_flags<'a>(lines: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for line in lines {
        let Some(request) = line.strip_prefix('.') else {
            continue;
        };
        let mut in_fl = false;
        for token in request.split_whitespace() {
            if token == "Fl" {
                in_fl = true;
            } else if is_macro(token) {
                in_fl = false;
            } else if in_fl && !matches!(token, "|" | "," | "." | ";" | ":" | "(" | ")" | "[" | "]") {
                flags.insert(format!("-{token}"));
            }
        }
    }
    flags
}

/// Lines of `.Sh NAME` up to the next `.Sh`.
fn section<'a>(page: &'a str, name: &str) -> Vec<&'a str> {
    let header = format!(".Sh {name}");
    page.lines()
        .skip_while(|l| l.trim_end() != header)
        .skip(1)
        .take_while(|l| !l.starts_with(".Sh "))
        .collect()
}

/// True when some line of `page` starts with `.It MACRO WORD`.
fn has_item(page: &str, mac: &str, word: &str) -> bool {
    page.lines().any(|line| {
        let mut tokens = line.split_whitespace();
        tokens.next() == Some(".It") && tokens.next() == Some(mac) && tokens.next() == Some(word)
    })
}

#[test]
fn the_program_page_documents_every_command_option_and_variable() {
    let page = read("man/interlude.8");
    let flags = mdoc_flags(page.lines());
    let synopsis = section(&page, "SYNOPSIS");
    assert!(!synopsis.is_empty(), "man/interlude.8 has no SYNOPSIS");
    // SYNOPSIS blocks each start with `.Nm`.
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    for line in synopsis {
        if line.trim_end() == ".Nm" || blocks.is_empty() {
            blocks.push(Vec::new());
        }
        blocks.last_mut().expect("a block").push(line);
    }

    let top = parse_help(&interlude(&["--help"]));
    assert!(
        top.commands.len() >= 10 && top.options.contains("--config"),
        "could not read `interlude --help`: {top:?}"
    );
    let mut problems = Vec::new();
    let check_options = |help: &Help, context: &str, problems: &mut Vec<String>| {
        for option in &help.options {
            if !flags.contains(option) {
                problems.push(format!("option {option} ({context}) is not documented as `Fl`"));
            }
        }
        for name in &help.env {
            if !has_item(&page, "Ev", name) {
                problems.push(format!(
                    "variable {name} ({context}) has no `.It Ev {name}` entry"
                ));
            }
        }
    };
    check_options(&top, "interlude --help", &mut problems);

    for command in &top.commands {
        if !has_item(&page, "Cm", command) {
            problems.push(format!("command {command} has no `.It Cm {command}` entry"));
        }
        let names_command = |line: &&str| {
            let tokens: Vec<&str> = line.trim_start_matches('.').split_whitespace().collect();
            tokens.windows(2).any(|pair| pair == ["Cm", command.as_str()])
        };
        let Some(block) = blocks.iter().find(|b| b.iter().any(names_command)) else {
            problems.push(format!("command {command} has no SYNOPSIS line"));
            continue;
        };
        if command == "help" {
            // clap's own `help [COMMAND]`: it has no options of its own.
            continue;
        }
        let help = parse_help(&interlude(&[command, "--help"]));
        check_options(&help, &format!("interlude {command} --help"), &mut problems);
        let shown = mdoc_flags(block.iter().copied());
        for option in help.options.difference(&top.options) {
            if !shown.contains(option) {
                problems.push(format!(
                    "option {option} is missing from the SYNOPSIS of {command}"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "man/interlude.8 is out of date:\n{}",
        problems.join("\n")
    );
}

/// Every config key, from the schema's own serde definitions (through the
/// library): a new field in any config struct fails this test until both
/// pages document it.
fn schema_keys() -> BTreeSet<String> {
    let keys: BTreeSet<String> = interlude::config::keys::all()
        .into_iter()
        .map(String::from)
        .collect();
    assert!(
        keys.len() >= 40,
        "the schema walk found only {} keys: {keys:?}",
        keys.len()
    );
    for known in [
        "proxies",
        "grace_period",
        "when_paused",
        "expect_status",
        "weight",
    ] {
        assert!(keys.contains(known), "the schema walk missed {known}: {keys:?}");
    }
    keys
}

/// True when some line, once indentation, `#` and `- ` are stripped,
/// starts with `KEY:`.
fn yaml_mentions(text: &str, key: &str) -> bool {
    let wanted = format!("{key}:");
    text.lines().any(|line| {
        let line = line.trim_start().trim_start_matches('#').trim_start();
        let line = line.strip_prefix("- ").unwrap_or(line).trim_start();
        line.starts_with(&wanted)
    })
}

/// The first literal display of the EXAMPLES section: the full example.
fn page_example(page: &str) -> String {
    let examples = section(page, "EXAMPLES");
    let body: Vec<&str> = examples
        .iter()
        .skip_while(|l| !l.starts_with(".Bd -literal"))
        .skip(1)
        .take_while(|l| !l.starts_with(".Ed"))
        .copied()
        .collect();
    assert!(
        !body.is_empty(),
        "man/interlude.yaml.5 has no example in EXAMPLES"
    );
    body.join("\n").replace("\\e", "\\") + "\n"
}

/// Drops each `tls:` mapping (its line and the deeper-indented ones below):
/// `check` reads the certificate files it names, which a test cannot ship.
fn without_tls(yaml: &str) -> String {
    let mut out = String::new();
    let mut dropping: Option<usize> = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(depth) = dropping {
            if indent > depth || line.trim().is_empty() {
                continue;
            }
            dropping = None;
        }
        if line.trim_start().starts_with("tls:") {
            dropping = Some(indent);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Points `state_dir:` into `dir`: `check` tries to create and write the
/// state directory, which a user running the tests may not do in /var/lib.
fn with_state_dir_in(yaml: &str, dir: &Path) -> String {
    yaml.lines()
        .map(|line| match line.strip_prefix("state_dir:") {
            Some(_) => format!("state_dir: {}\n", dir.join("state").display()),
            None => format!("{line}\n"),
        })
        .collect()
}

fn check_config(path: &Path) -> Result<(), String> {
    let output = Command::new(env!("CARGO_BIN_EXE_interlude"))
        .args(["check", "-c"])
        .arg(path)
        .output()
        .expect("run interlude check");
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn the_config_page_and_the_example_config_document_every_key() {
    let keys = schema_keys();
    let page = read("man/interlude.yaml.5");
    let shipped = read("etc/interlude/interlude.yaml");
    let example = page_example(&page);
    let mut problems = Vec::new();
    for key in &keys {
        if !has_item(&page, "Cm", key) {
            problems.push(format!(
                "man/interlude.yaml.5: key {key} has no `.It Cm {key}` entry"
            ));
        }
        if !yaml_mentions(&example, key) {
            problems.push(format!(
                "man/interlude.yaml.5: key {key} is missing from the full example"
            ));
        }
        if !yaml_mentions(&shipped, key) {
            problems.push(format!("etc/interlude/interlude.yaml: key {key} is missing"));
        }
    }
    assert!(
        problems.is_empty(),
        "the config documentation is out of date:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_example_configs_pass_check() {
    let page = read("man/interlude.yaml.5");
    let dir = tempfile::tempdir().expect("temp dir");
    let example = dir.path().join("example.yaml");
    let example_text = with_state_dir_in(&without_tls(&page_example(&page)), dir.path());
    assert!(
        example_text.contains("state_dir: "),
        "the example lost its state_dir"
    );
    std::fs::write(&example, example_text).expect("write the example");
    if let Err(errors) = check_config(&example) {
        panic!("the example of man/interlude.yaml.5 does not pass `interlude check`:\n{errors}");
    }
    if let Err(errors) = check_config(&root().join("etc/interlude/interlude.yaml")) {
        panic!("etc/interlude/interlude.yaml does not pass `interlude check`:\n{errors}");
    }
}

#[test]
fn the_scanners_see_what_they_should() {
    let help = parse_help(
        "Usage: x\n\nCommands:\n  run  Run it\n  help  Help\n\nOptions:\n  -c, --config <FILE>  The file \
         [env: X_CONFIG=] [default: /x]\n      --json  Print '-h' JSON\n  -h, --help  Help\n",
    );
    assert_eq!(help.commands, ["run", "help"]);
    assert_eq!(
        help.options.iter().collect::<Vec<_>>(),
        ["--config", "--help", "--json", "-c", "-h"]
    );
    assert_eq!(help.env.iter().collect::<Vec<_>>(), ["X_CONFIG"]);
    let flags = mdoc_flags([
        ".It Fl c Ar file , Fl -config Ar file",
        ".Fl h | -help",
        "text Fl -not",
    ]);
    assert_eq!(
        flags.iter().collect::<Vec<_>>(),
        ["--config", "--help", "-c", "-h"]
    );
    assert!(yaml_mentions("a:\n  # - address: x\n", "address"));
    assert!(!yaml_mentions("a:\n  addresses: x\n", "address"));
    assert_eq!(
        without_tls("p:\n  tls:\n    cert: x\n  mode: tcp\n"),
        "p:\n  mode: tcp\n"
    );
}
