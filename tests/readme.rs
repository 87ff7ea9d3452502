//! README.md's commands, held to their word: the usage command and the QMP mirror walkthrough
//! run as written against this build (its paths under `/var/lib/images/` and `/run/` moved to a
//! scratch directory), and every `target/...` binary a command runs is built by a `cargo build`
//! command the README gives. The expensive ones (`demo` in release, `cargo test`, a guest) are
//! what CI runs anyway or what `tests/guest.rs` covers.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::*;

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md is readable")
}

/// The fenced blocks of language `lang`, in order.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(tag)) if tag == lang => current = Some(String::new()),
            (Some(_), Some("")) => blocks.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// The shell commands of a block: continuation lines joined, comments dropped, split into
/// words (README's commands quote nothing they run here).
fn commands(block: &str) -> Vec<Vec<String>> {
    let joined = block.replace("\\\n", " ");
    joined
        .lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .filter(|words: &Vec<String>| !words.is_empty())
        .collect()
}

fn all_commands() -> Vec<Vec<String>> {
    blocks(&readme(), "sh")
        .iter()
        .flat_map(|b| commands(b))
        .collect()
}

#[test]
fn every_binary_a_readme_command_runs_is_built_by_a_readme_build_command() {
    let commands = all_commands();
    let builds: Vec<&Vec<String>> = commands
        .iter()
        .filter(|c| c.len() > 1 && c[0] == "cargo" && c[1] == "build")
        .collect();
    let mut checked = 0;
    for word in commands.iter().flatten() {
        let Some(rest) = word.strip_prefix("target/") else {
            continue;
        };
        let (profile, binary) = rest.split_once('/').expect("target/<profile>/<binary>");
        let built = builds.iter().any(|build| {
            let release = build.iter().any(|w| w == "--release");
            let package = build
                .windows(2)
                .any(|w| (w[0] == "-p" || w[0] == "--package") && w[1] == binary);
            // Without --workspace or -p, cargo builds the root package only: `ringblk`.
            let builds_binary =
                binary == "ringblk" || package || build.iter().any(|w| w == "--workspace");
            builds_binary && release == (profile == "release")
        });
        assert!(
            built,
            "README runs {word}, but none of its build commands builds it: {builds:?}"
        );
        checked += 1;
    }
    assert!(
        checked > 0,
        "README runs no built binary: the parser lost them"
    );
}

/// Moves README's example paths into `dir`.
fn scratch(word: &str, dir: &Path) -> String {
    let dir = dir.display();
    word.replace("/var/lib/images/", &format!("{dir}/"))
        .replace("/run/", &format!("{dir}/"))
}

/// A QMP client on a raw socket that keeps the events it reads past.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let stream = UnixStream::connect(path).expect("the monitor accepts");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut qmp = Qmp {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
            events: Vec::new(),
        };
        assert!(qmp.message().get("QMP").is_some(), "a greeting first");
        qmp
    }

    fn message(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("a message");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad message {line:?}: {e}"))
    }

    /// Sends `text`; returns the reply, keeping the events that come before it.
    fn execute(&mut self, text: &str) -> Value {
        self.writer.write_all(text.as_bytes()).unwrap();
        loop {
            let message = self.message();
            if message.get("event").is_some() {
                self.events.push(message);
            } else {
                return message;
            }
        }
    }

    /// Waits for event `name` (or finds it among those already read).
    fn wait_for(&mut self, name: &str) -> Value {
        if let Some(at) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(at);
        }
        loop {
            let message = self.message();
            if message["event"] == name {
                return message;
            }
        }
    }
}

#[test]
fn the_usage_and_mirror_commands_run_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let commands = all_commands();
    let usage = commands
        .iter()
        .find(|c| c[0] == "ringblk" && c.get(1).is_some_and(|w| w == "--blockdev"))
        .expect("README shows how to export an image");
    let monitor = commands
        .iter()
        .find(|c| c[0] == "ringblk" && c.get(1).is_some_and(|w| w == "..."))
        .expect("README shows how to add a monitor");
    let args: Vec<String> = usage[1..]
        .iter()
        .chain(&monitor[2..])
        .map(|w| scratch(w, dir.path()))
        .collect();
    let walkthrough = blocks(&readme(), "json").concat();
    for image in ["vm.img", "new.img"] {
        assert!(
            args.iter().any(|a| a.contains(image)) || walkthrough.contains(image),
            "README no longer names {image}: update this test"
        );
        let file = std::fs::File::create(dir.path().join(image)).unwrap();
        file.set_len(16 << 20).unwrap();
    }
    let qmp_socket = args
        .iter()
        .find_map(|a| a.split(',').find_map(|kv| kv.strip_prefix("path=")))
        .expect("the chardev has a path")
        .to_owned();
    let daemon = DaemonProcess::start(env!("CARGO_BIN_EXE_ringblk"), &args, qmp_socket.as_ref());
    let pidfile = dir.path().join("ringblk.pid");
    assert!(
        std::fs::read_to_string(&pidfile).is_ok_and(|pid| !pid.trim().is_empty()),
        "the pidfile was written"
    );
    assert!(dir.path().join("vm.sock").exists(), "the export listens");

    let mut qmp = Qmp::connect(qmp_socket.as_ref());
    let mut steps = 0;
    for line in walkthrough.lines() {
        if line.starts_with('{') {
            let reply = qmp.execute(&scratch(line, dir.path()));
            assert!(reply.get("return").is_some(), "{line}: {reply}");
        } else if let Some(event) = line
            .split_whitespace()
            .map(|w| w.trim_end_matches(':'))
            .find(|w| w.starts_with("BLOCK_JOB_"))
        {
            let data = &qmp.wait_for(event)["data"];
            assert!(data.get("error").is_none(), "{event}: {data}");
        }
        steps += 1;
    }
    assert!(steps >= 5, "the walkthrough lost its steps");
    let exports = qmp.execute(r#"{"execute": "query-block-exports"}"#);
    assert_eq!(
        exports["return"][0]["node-name"], "new",
        "the export serves the new image after the pivot"
    );
    assert!(daemon.terminate().success(), "ringblk exits 0 on SIGTERM");
}
