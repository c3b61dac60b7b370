//! Command lines of VisitMe's binaries (`worker`, `web`): a setting that is
//! wrong is refused before anything starts, in one line that names the
//! environment variable, the value and what it may be, with exit code 2.

use clap::{CommandFactory, FromArgMatches, error::ContextKind, error::ErrorKind};

/// The exit code of a refused setting (clap's own for usage errors).
pub const CONFIG_EXIT_CODE: i32 = 2;

/// Parses the command line and the environment into `T`. `--help` and
/// `--version` print and exit 0; anything else clap refuses is one line on
/// stderr, `<binary>: …`, and exit 2.
pub fn parse<T: CommandFactory + FromArgMatches>(binary: &str) -> T {
    let mut command = T::command();
    let parsed = command
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|mut matches| T::from_arg_matches_mut(&mut matches));
    match parsed {
        Ok(parsed) => parsed,
        Err(error) => match error.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => error.exit(),
            _ => refuse(binary, &describe(&command, &error)),
        },
    }
}

/// Prints `<binary>: <message>` on stderr and exits 2.
pub fn refuse(binary: &str, message: &str) -> ! {
    eprintln!("{binary}: {}", message.replace('\n', " "));
    std::process::exit(CONFIG_EXIT_CODE)
}

/// One line for a clap error: for a bad value, the setting's variable and
/// flag, the value (unless the setting hides it: secrets) and the rule.
fn describe(command: &clap::Command, error: &clap::Error) -> String {
    let flag = match error.get(ContextKind::InvalidArg) {
        Some(clap::error::ContextValue::String(flag)) => Some(flag.clone()),
        _ => None,
    };
    let value = match error.get(ContextKind::InvalidValue) {
        Some(clap::error::ContextValue::String(value)) => Some(value.clone()),
        _ => None,
    };
    let arg = flag.as_deref().and_then(|flag| {
        let long = flag.trim_start_matches('-').split([' ', '=']).next()?;
        command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(long))
    });
    let rule = match std::error::Error::source(error) {
        Some(source) => source.to_string(),
        None => first_line(error),
    };
    match (arg, value) {
        (Some(arg), Some(value)) if error.kind() == ErrorKind::ValueValidation => {
            let long = arg.get_long().unwrap_or_default();
            let name = arg.get_env().map_or_else(
                || format!("--{long}"),
                |env| env.to_string_lossy().into_owned(),
            );
            let shown = if arg.is_hide_env_values_set() {
                "(hidden)".to_owned()
            } else {
                format!("{value:?}")
            };
            format!("invalid {name}={shown} (--{long}): {rule}")
        }
        _ => first_line(error),
    }
}

/// The first line of clap's own message, without its `error: ` prefix.
fn first_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let line = rendered.lines().next().unwrap_or_default();
    format!(
        "{} (see --help)",
        line.strip_prefix("error: ").unwrap_or(line)
    )
}
