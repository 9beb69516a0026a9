//! The control file: which functions to fault, and how. Parsed by the module, written by tests
//! and drills ([`ControlFile`]). The format is in the crate docs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cryptoki_sys::CK_RV;

use crate::error::Error;
use crate::function::{FUNCTIONS, Function};
use crate::rv;

/// Which calls a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `*`: every function without a rule of its own.
    All,
    /// One function (`C_Sign`).
    Function(Function),
}

/// What happens to a faulted call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `stall`: block until the rule is lifted (a hung network HSM), then apply whatever rule
    /// is in force by then (usually none: forward the call).
    Stall,
    /// `delay <ms>`: sleep, then forward the call.
    Delay(Duration),
    /// `fail <CKR_*>`: return this value without forwarding the call.
    Fail(CK_RV),
}

/// One line of a control file: a target and an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The calls it applies to.
    pub target: Target,
    /// What happens to them.
    pub action: Action,
}

impl Rule {
    /// A rule for the function called `function` (`C_Sign`), or for every function (`*`).
    ///
    /// # Errors
    /// [`Error::UnknownFunction`] when `function` is neither `*` nor a PKCS#11 2.40 function
    /// name.
    pub fn new(function: &str, action: Action) -> Result<Rule, Error> {
        Ok(Rule {
            target: parse_target(function).map_err(|_| Error::UnknownFunction {
                name: function.to_owned(),
            })?,
            action,
        })
    }

    fn parse(line: &str) -> Result<Option<Rule>, String> {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(target) = words.next() else {
            return Ok(None);
        };
        let target = parse_target(target)?;
        let action = match (words.next(), words.next()) {
            (Some("stall"), None) => Action::Stall,
            (Some("delay"), Some(ms)) => {
                let ms = ms.strip_suffix("ms").unwrap_or(ms);
                Action::Delay(Duration::from_millis(ms.parse().map_err(|_| {
                    format!("`delay {ms}`: expected a number of milliseconds")
                })?))
            }
            (Some("fail"), Some(value)) => Action::Fail(rv::parse(value).ok_or_else(|| {
                format!("`fail {value}`: expected a CKR_* name or a number (decimal or 0x…)")
            })?),
            (Some(action @ ("stall" | "delay" | "fail")), _) => {
                return Err(format!(
                    "`{action}` takes {}",
                    match action {
                        "stall" => "no argument",
                        "delay" => "one argument, milliseconds",
                        _ => "one argument, a CKR_* value",
                    }
                ));
            }
            (Some(other), _) => {
                return Err(format!(
                    "unknown action `{other}`: expected stall, delay <ms> or fail <CKR_*>"
                ));
            }
            (None, _) => return Err("missing action: stall, delay <ms> or fail <CKR_*>".into()),
        };
        if let Some(extra) = words.next() {
            return Err(format!("unexpected `{extra}` after the action"));
        }
        Ok(Some(Rule { target, action }))
    }
}

fn parse_target(word: &str) -> Result<Target, String> {
    if word == "*" {
        return Ok(Target::All);
    }
    Function::from_name(word)
        .map(Target::Function)
        .ok_or_else(|| {
            format!("`{word}` is not `*` nor a PKCS#11 2.40 function name (such as C_Sign)")
        })
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::All => f.write_str("*"),
            Target::Function(function) => f.write_str(function.name()),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Stall => f.write_str("stall"),
            Action::Delay(delay) => write!(f, "delay {}", delay.as_millis()),
            Action::Fail(value) => write!(f, "fail {}", rv::name(*value)),
        }
    }
}

/// The control file's line for this rule (the format is in the crate docs).
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.target, self.action)
    }
}

/// The faults in force: the rules of a control file, resolved per function (a function's own
/// rule, else the `*` rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Faults {
    rules: Vec<Rule>,
    by_function: [Option<Action>; FUNCTIONS.len()],
}

impl Faults {
    /// No faults: every call is forwarded.
    pub(crate) fn none() -> Faults {
        Faults {
            rules: Vec::new(),
            by_function: [None; FUNCTIONS.len()],
        }
    }

    /// Parses a control file's text.
    pub(crate) fn parse(text: &str) -> Result<Faults, Error> {
        let mut rules: Vec<Rule> = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let error = |reason| Error::Control {
                line: number + 1,
                reason,
            };
            if let Some(rule) = Rule::parse(line).map_err(error)? {
                if rules.iter().any(|r| r.target == rule.target) {
                    return Err(error(format!(
                        "a second rule for `{}`: one rule per function",
                        rule.target
                    )));
                }
                rules.push(rule);
            }
        }
        Ok(Faults::from_rules(rules))
    }

    fn from_rules(rules: Vec<Rule>) -> Faults {
        let all = rules
            .iter()
            .find(|r| r.target == Target::All)
            .map(|r| r.action);
        let mut by_function = [all; FUNCTIONS.len()];
        for rule in &rules {
            if let Target::Function(function) = rule.target {
                by_function[function.index()] = Some(rule.action);
            }
        }
        Faults { rules, by_function }
    }

    /// The action for a call of `function`, if any.
    pub(crate) fn action(&self, function: Function) -> Option<Action> {
        self.by_function[function.index()]
    }

    /// The rules, in the order of the file.
    pub(crate) fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

/// A control file, as tests and drills write it. Each change is written atomically (a
/// temporary file renamed over it), so the module never reads half a file.
#[derive(Debug, Clone)]
pub struct ControlFile {
    path: PathBuf,
}

impl ControlFile {
    /// The control file at `path` (the module's `PKCS11_FAULT_CONTROL`). Nothing is written yet.
    pub fn new(path: impl Into<PathBuf>) -> ControlFile {
        ControlFile { path: path.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts exactly these rules in force (replacing any others). The module applies them
    /// within one poll (about 20 ms); [`Stats::wait`](crate::Stats::wait) for
    /// [`Stats::faults`](crate::Stats::faults) to equal them to know they are.
    ///
    /// # Errors
    /// [`Error::Control`] for two rules with the same target; [`Error::Io`] when the file
    /// cannot be written.
    pub fn set(&self, rules: &[Rule]) -> Result<(), Error> {
        let text: String = rules.iter().map(|r| format!("{r}\n")).collect();
        Faults::parse(&text)?;
        write_atomically(&self.path, text.as_bytes())
    }

    /// Lifts every fault (removes the file). Stalled calls are released within one poll.
    ///
    /// # Errors
    /// [`Error::Io`] when the file exists and cannot be removed.
    pub fn clear(&self) -> Result<(), Error> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io {
                context: "removing",
                path: self.path.clone(),
                source,
            }),
        }
    }
}

/// Writes `bytes` to a temporary file next to `path`, then renames it over `path`.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let temporary = path.with_file_name(name);
    let io = |context, path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io {
            context,
            path,
            source,
        }
    };
    std::fs::write(&temporary, bytes).map_err(io("writing", &temporary))?;
    std::fs::rename(&temporary, path).map_err(io("renaming a temporary file to", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_format() {
        let faults = Faults::parse(
            "# a comment\n\
             C_Sign stall\n\
             \n\
             C_UnwrapKey fail CKR_DEVICE_ERROR   # trailing comment\n\
             C_GenerateRandom fail 0x30\n\
             * delay 50\n\
             C_Login delay 5ms\n",
        )
        .expect("valid");
        let sign = Function::from_name("C_Sign").unwrap();
        let unwrap = Function::from_name("C_UnwrapKey").unwrap();
        let random = Function::from_name("C_GenerateRandom").unwrap();
        let login = Function::from_name("C_Login").unwrap();
        let info = Function::from_name("C_GetSessionInfo").unwrap();
        assert_eq!(faults.action(sign), Some(Action::Stall));
        assert_eq!(faults.action(unwrap), Some(Action::Fail(0x30)));
        assert_eq!(faults.action(random), Some(Action::Fail(0x30)));
        assert_eq!(
            faults.action(login),
            Some(Action::Delay(Duration::from_millis(5)))
        );
        assert_eq!(
            faults.action(info),
            Some(Action::Delay(Duration::from_millis(50)))
        );
        assert_eq!(faults.rules().len(), 5);
        assert_eq!(
            faults.rules()[1].to_string(),
            "C_UnwrapKey fail CKR_DEVICE_ERROR"
        );
    }

    #[test]
    fn rejects_what_it_cannot_apply() {
        for (text, line) in [
            ("C_sign stall", 1),
            ("C_Sign\n", 1),
            ("\nC_Sign stall now", 2),
            ("C_Sign delay soon", 1),
            ("C_Sign fail", 1),
            ("C_Sign fail CKR_NOPE", 1),
            ("C_Sign hang", 1),
            ("C_Sign stall\nC_Sign delay 5", 2),
            ("C_GetFunctionList stall", 1),
        ] {
            match Faults::parse(text) {
                Err(Error::Control { line: got, .. }) => assert_eq!(got, line, "{text:?}"),
                other => panic!("{text:?} gave {other:?}"),
            }
        }
        assert_eq!(Faults::parse("").expect("empty"), Faults::none());
    }

    #[test]
    fn rules_print_as_they_parse() {
        let rules = [
            Rule::new("C_Sign", Action::Stall).unwrap(),
            Rule::new("*", Action::Delay(Duration::from_millis(7))).unwrap(),
            Rule::new("C_WrapKey", Action::Fail(0x8000_0001)).unwrap(),
        ];
        let text: String = rules.iter().map(|r| format!("{r}\n")).collect();
        assert_eq!(Faults::parse(&text).unwrap().rules(), rules);
        assert!(matches!(
            Rule::new("C_sign", Action::Stall),
            Err(Error::UnknownFunction { name }) if name == "C_sign"
        ));
    }
}
