//! Processes under test: killed and reaped on drop, stderr kept and shown when a test fails.

use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::wait_until;

tokio::task_local! {
    /// Stderr tails of the processes a test started, collected as they are dropped.
    static PROCESS_LOGS: Arc<Mutex<Vec<String>>>;
}

/// Runs an async test body; if it returns `Err`, prints the stderr tails of every [`Child`]
/// it started (they are gone by then) before returning the error.
pub async fn e2e<F>(body: F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let logs = Arc::new(Mutex::new(Vec::new()));
    let result = PROCESS_LOGS.scope(logs.clone(), body).await;
    if result.is_err() {
        let logs = logs.lock().unwrap_or_else(|e| e.into_inner());
        for log in logs.iter() {
            eprintln!("{log}");
        }
    }
    result
}

/// A process under test. Dropping it kills (SIGKILL) and reaps it; if the test is failing, the
/// tail of its stderr is printed first. stdout is read line by line from a background thread.
pub struct Child {
    name: String,
    proc: std::process::Child,
    stderr_path: PathBuf,
    stdout_lines: std_mpsc::Receiver<String>,
    logs: Option<Arc<Mutex<Vec<String>>>>,
}

impl Child {
    /// Spawns `cmd` with stdin closed, stdout piped (see [`Child::stdout_line`]) and stderr
    /// written to `<log_dir>/<name>[.N].stderr.log`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> anyhow::Result<Self> {
        // A restarted process gets its own file: the previous run's log may explain the next.
        let stderr_path = (1..)
            .map(|n| match n {
                1 => log_dir.join(format!("{name}.stderr.log")),
                n => log_dir.join(format!("{name}.{n}.stderr.log")),
            })
            .find(|p| !p.exists())
            .context("log file name")?;
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("create {}", stderr_path.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .env("NO_COLOR", "1");
        let mut proc = cmd
            .spawn()
            .with_context(|| format!("{name}: spawn {cmd:?}"))?;
        let stdout = proc.stdout.take().context("piped stdout")?;
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Child {
            name: name.to_string(),
            proc,
            stderr_path,
            stdout_lines: rx,
            logs: PROCESS_LOGS.try_with(Arc::clone).ok(),
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.proc.id()
    }

    /// The next stdout line, waiting up to `timeout`. Errors (with the stderr tail) if the
    /// process exits or closes stdout first.
    pub fn stdout_line(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .stdout_lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => return Ok(line),
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.wait_exit(Duration::from_secs(5));
                    bail!(
                        "{} closed stdout (exit: {status:?}); stderr:\n{}",
                        self.name,
                        self.stderr_tail(40)
                    );
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = self.proc.try_wait() {
                        bail!(
                            "{} exited ({status}) before printing a line; stderr:\n{}",
                            self.name,
                            self.stderr_tail(40)
                        );
                    }
                    if left.is_zero() {
                        bail!(
                            "{} printed no stdout line within {timeout:?}; stderr:\n{}",
                            self.name,
                            self.stderr_tail(40)
                        );
                    }
                }
            }
        }
    }

    /// The exit status if the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.proc.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        let _ = wait_until(timeout, "exit", || {
            status = self.try_exit();
            status.is_some()
        });
        status
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        let all = self.stderr();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Where stderr is kept.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
        let report = || {
            format!(
                "----- {} (pid {}) stderr, last 80 lines -----\n{}\n----- end of {} stderr -----",
                self.name,
                self.proc.id(),
                self.stderr_tail(80),
                self.name
            )
        };
        if std::thread::panicking() {
            eprintln!("{}", report());
        } else if let Some(logs) = &self.logs {
            logs.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(report());
        }
    }
}

/// Runs a command to completion with stdin closed; kills it and errors after `timeout`.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
    run_with_stdin(cmd, Stdio::null(), timeout)
}

/// Runs a command to completion reading `stdin` (a file, say); kills it and errors after
/// `timeout`.
pub fn run_with_stdin(
    mut cmd: Command,
    stdin: impl Into<Stdio>,
    timeout: Duration,
) -> anyhow::Result<Output> {
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1");
    let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let mut status = None;
    let waited = wait_until(timeout, "command to exit", || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if waited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        let stderr = err_t.join().unwrap_or_default();
        bail!(
            "{cmd:?} did not exit within {timeout:?}; stderr:\n{}",
            String::from_utf8_lossy(&stderr)
        );
    }
    Ok(Output {
        status: status.context("exit status")?,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}
