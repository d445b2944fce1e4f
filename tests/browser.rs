//! `wsgate demo` in a real browser: Debian's Chromium, driven by `tests/browser/demo.mjs`
//! (playwright-core), cancels a query and closes a tab, and checks that the demo backend
//! heard Close 1000 and 1001 through wsgate and that the admin page shows both endings;
//! then runs a search streamed as server-sent events (fetch and a ReadableStream reader),
//! sees it listed open on the admin page, cancels it (AbortController), and checks that
//! the demo backend learned at once that its stream was gone and that the admin page
//! shows the HTTP ending `client_aborted` with its release time.
//! The page's own code (the demo's app.js, the admin page's admin.js) only runs in a
//! browser, so this is the test of both.
//!
//! Skipped, saying why, when Chromium, Node or `tests/browser/node_modules` is missing;
//! with `WSGATE_REQUIRE_TOOLS` set (as `.ci/run` does) a missing tool is a failure.

// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

const CHROMIUM: &str = "/usr/bin/chromium";
/// Bound on `wsgate demo` printing its two URLs.
const START_LIMIT: Duration = Duration::from_secs(20);
/// Bound on the whole browser script (each of its waits is bounded at 15 s).
const BROWSER_LIMIT: Duration = Duration::from_secs(90);
/// Bound on wsgate exiting after SIGTERM (nothing is open by then).
const EXIT_LIMIT: Duration = Duration::from_secs(20);

/// True when CI installed the tools: then this test must not skip.
fn tools_required() -> bool {
    std::env::var_os("WSGATE_REQUIRE_TOOLS").is_some()
}

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// What is missing to run the browser, if anything.
fn missing_tools() -> Vec<String> {
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).exists() {
        missing.push(format!("{CHROMIUM} (apt-get install chromium)"));
    }
    let node = std::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !node {
        missing.push("node (apt-get install nodejs npm)".into());
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        missing.push("tests/browser/node_modules/playwright-core (npm ci in tests/browser)".into());
    }
    missing
}

/// Reads everything `r` produces, so the child never blocks on a full pipe.
fn collect(
    mut r: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf).await;
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The output of a collector, waiting a little for the child's pipe to close.
async fn collected(task: tokio::task::JoinHandle<String>) -> String {
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(Ok(text)) => text,
        _ => "(not collected)".into(),
    }
}

#[tokio::test]
async fn a_browser_cancels_and_closes_tabs_through_wsgate_demo_and_the_admin_page_shows_it() {
    let missing = missing_tools();
    if !missing.is_empty() {
        assert!(
            !tools_required(),
            "missing (WSGATE_REQUIRE_TOOLS is set): {}",
            missing.join(", ")
        );
        eprintln!(
            "skipping: missing {} (.ci/run installs them)",
            missing.join(", ")
        );
        return;
    }

    // Short liveness timers, as a demo would want; operator closes allowed.
    let config = temp_file(
        "demo.toml",
        "listen = \"127.0.0.1:0\"\n\
         [websocket]\nping_interval = \"3s\"\npong_timeout = \"2s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\nallow_close = true\n",
    );
    let mut wsgate = Command::new(BIN)
        .arg("demo")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = collect(wsgate.stderr.take().unwrap());
    let mut stdout = BufReader::new(wsgate.stdout.take().unwrap());

    // "demo:  http://127.0.0.1:PORT/" and "admin: http://127.0.0.1:PORT/", in that order.
    let urls = tokio::time::timeout(START_LIMIT, async {
        let (mut demo, mut admin) = (None, None);
        let mut line = String::new();
        while demo.is_none() || admin.is_none() {
            line.clear();
            if stdout.read_line(&mut line).await.unwrap_or(0) == 0 {
                return None;
            }
            if let Some(url) = line.strip_prefix("demo:") {
                demo = Some(url.trim().to_string());
            } else if let Some(url) = line.strip_prefix("admin:") {
                admin = Some(url.trim().to_string());
            }
        }
        Some((demo.unwrap(), admin.unwrap()))
    })
    .await;
    let Ok(Some((demo_url, admin_url))) = urls else {
        let _ = wsgate.kill().await;
        panic!(
            "`wsgate demo` exited, or printed no demo and admin URLs within {START_LIMIT:?}; its log:\n{}",
            collected(log).await
        );
    };
    let rest_of_stdout = collect(stdout);

    let node = tokio::time::timeout(
        BROWSER_LIMIT,
        Command::new("node")
            .arg("demo.mjs")
            .current_dir(browser_dir())
            .env("WSGATE_DEMO_URL", &demo_url)
            .env("WSGATE_ADMIN_URL", &admin_url)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;

    sigterm(&wsgate).await;
    let exit = tokio::time::timeout(EXIT_LIMIT, wsgate.wait()).await;
    if exit.is_err() {
        let _ = wsgate.kill().await;
    }
    let log = collected(log).await;
    let _ = collected(rest_of_stdout).await;

    let node = match node {
        Ok(output) => output.unwrap(),
        Err(_) => panic!("the browser script took over {BROWSER_LIMIT:?}; wsgate's log:\n{log}"),
    };
    let script_out = String::from_utf8_lossy(&node.stdout);
    let script_err = String::from_utf8_lossy(&node.stderr);
    println!("{script_out}{script_err}");
    assert!(
        node.status.success(),
        "the browser script failed ({}):\n{script_out}{script_err}\nwsgate's log:\n{log}",
        node.status
    );
    match exit {
        Ok(status) => {
            let status = status.unwrap();
            assert!(
                status.success(),
                "wsgate demo exited with {status} after SIGTERM; its log:\n{log}"
            );
        }
        Err(_) => {
            panic!("wsgate demo did not exit within {EXIT_LIMIT:?} of SIGTERM; its log:\n{log}")
        }
    }
}
