//! Runs the `wraft` CLI as a child process and captures what it did.

use std::time::Duration;

use tokio::process::Command;

use crate::paths::wraft_bin;

/// The longest a CLI invocation may take before the test fails as a hang.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// What a CLI invocation did.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The exit code (-1 if the process was killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// stdout parsed as JSON: the whole of it, else its last non-empty line.
    pub fn json(&self) -> serde_json::Value {
        let trimmed = self.stdout.trim();
        if let Ok(v) = serde_json::from_str(trimmed) {
            return v;
        }
        let last = trimmed
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        serde_json::from_str(last.trim())
            .unwrap_or_else(|e| panic!("CLI stdout is not JSON ({e}): {self}"))
    }

    /// Panics with everything the CLI printed unless it exited with `code`.
    pub fn expect_code(&self, code: i32, what: &str) -> &Self {
        assert_eq!(self.code, code, "{what}: expected exit code {code}; {self}");
        self
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {}, stdout {:?}, stderr {:?}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `wraft ARGS` with extra environment `envs` (an inherited `WRAFT_ENDPOINTS` is removed
/// first), failing the test if it does not exit within [`CLI_TIMEOUT`].
pub async fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> CliOutput {
    run_cli_with_input(args, envs, b"").await
}

/// [`run_cli`] with `input` on the command's standard input.
pub async fn run_cli_with_input(args: &[&str], envs: &[(&str, &str)], input: &[u8]) -> CliOutput {
    use tokio::io::AsyncWriteExt as _;
    let mut cmd = Command::new(wraft_bin());
    cmd.args(args)
        .env_remove("WRAFT_ENDPOINTS")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let what = format!("`wraft {}`", args.join(" "));
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what} could not be run: {e}"));
    let mut stdin = child
        .stdin
        .take()
        .unwrap_or_else(|| panic!("{what}: no stdin pipe"));
    let input = input.to_vec();
    // Written from a task of its own, so that a large input cannot block on a full pipe while
    // the command waits for us to read its output.
    let writer = tokio::spawn(async move {
        // A command that exits without reading its input closes the pipe: not our failure.
        let _ = stdin.write_all(&input).await;
    });
    let output = match tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("{what} could not be run: {e}"),
        // Dropping the `output()` future kills the child (kill_on_drop).
        Err(_) => panic!("{what} did not exit within {CLI_TIMEOUT:?}"),
    };
    let _ = writer.await;
    CliOutput {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
