//! Flag parsing: each subcommand declares its flags (name, value, default,
//! help); the usage text is generated from the same table.

use crate::error::{BenchError, Result};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

/// One flag of a subcommand.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    pub name: &'static str,
    /// Placeholder of the value; None for a switch.
    pub value: Option<&'static str>,
    pub default: Option<&'static str>,
    pub help: &'static str,
    /// May be given more than once.
    pub repeat: bool,
}

pub const fn opt(
    name: &'static str,
    value: &'static str,
    default: Option<&'static str>,
    help: &'static str,
) -> Flag {
    Flag {
        name,
        value: Some(value),
        default,
        help,
        repeat: false,
    }
}

pub const fn many(name: &'static str, value: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        value: Some(value),
        default: None,
        help,
        repeat: true,
    }
}

pub const fn switch(name: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        value: None,
        default: None,
        help,
        repeat: false,
    }
}

/// Parsed flags of one subcommand.
#[derive(Debug, Default)]
pub struct Args {
    values: BTreeMap<&'static str, Vec<String>>,
    defaults: BTreeMap<&'static str, &'static str>,
}

/// Usage text of a subcommand.
pub fn usage(cmd: &str, about: &str, flags: &[Flag]) -> String {
    let mut s = format!("{about}\n\nUSAGE: vlm-bench {cmd} [FLAGS]\n\n");
    for f in flags {
        let left = match f.value {
            Some(v) => format!("--{} {v}", f.name),
            None => format!("--{}", f.name),
        };
        let mut help = f.help.to_string();
        if let Some(d) = f.default {
            help.push_str(&format!(" [{d}]"));
        }
        if f.repeat {
            help.push_str(" (repeatable)");
        }
        s.push_str(&format!("  {left:32} {help}\n"));
    }
    s.push_str("  -h, --help                       this text\n");
    s
}

/// Outcome of parsing: flags, or a request for help.
#[derive(Debug)]
pub enum Parsed {
    Args(Args),
    Help,
}

pub fn parse(flags: &[Flag], args: Vec<OsString>) -> Result<Parsed> {
    use lexopt::prelude::*;
    let mut out = Args::default();
    for f in flags {
        if let Some(d) = f.default {
            out.defaults.insert(f.name, d);
        }
    }
    let mut p = lexopt::Parser::from_args(args);
    let usage_err = |e: lexopt::Error| BenchError::Usage(e.to_string());
    while let Some(arg) = p.next().map_err(usage_err)? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Long(name) => {
                let name = name.to_string();
                let f = flags
                    .iter()
                    .find(|f| f.name == name.as_str())
                    .ok_or_else(|| BenchError::Usage(format!("unknown flag --{name} (see --help)")))?;
                let v = match f.value {
                    Some(_) => p
                        .value()
                        .map_err(usage_err)?
                        .into_string()
                        .map_err(|_| BenchError::Usage(format!("--{name}: value is not UTF-8")))?,
                    None => String::new(),
                };
                let slot = out.values.entry(f.name).or_default();
                if !f.repeat && !slot.is_empty() {
                    return Err(BenchError::Usage(format!("--{name} given twice")));
                }
                slot.push(v);
            }
            other => return Err(BenchError::Usage(other.unexpected().to_string())),
        }
    }
    Ok(Parsed::Args(out))
}

impl Args {
    /// The value given, else the default.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .and_then(|v| v.last())
            .map(String::as_str)
            .or_else(|| self.defaults.get(name).copied())
    }

    pub fn given(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    pub fn all(&self, name: &str) -> Vec<String> {
        self.values.get(name).cloned().unwrap_or_default()
    }

    pub fn switch(&self, name: &str) -> bool {
        self.given(name)
    }

    pub fn required(&self, name: &str) -> Result<&str> {
        self.get(name)
            .ok_or_else(|| BenchError::Usage(format!("--{name} is required")))
    }

    pub fn path(&self, name: &str) -> Result<PathBuf> {
        self.required(name).map(PathBuf::from)
    }

    pub fn num<T: std::str::FromStr>(&self, name: &str) -> Result<T> {
        let s = self.required(name)?;
        s.trim()
            .parse()
            .map_err(|_| BenchError::Usage(format!("--{name}: invalid value `{s}`")))
    }

    pub fn f64(&self, name: &str) -> Result<f64> {
        let v: f64 = self.num(name)?;
        if !v.is_finite() {
            return Err(BenchError::Usage(format!("--{name}: must be finite")));
        }
        Ok(v)
    }

    /// A comma-separated list.
    pub fn list<T: std::str::FromStr>(&self, name: &str) -> Result<Vec<T>> {
        let s = self.required(name)?;
        s.split(',')
            .filter(|x| !x.trim().is_empty())
            .map(|x| {
                x.trim()
                    .parse()
                    .map_err(|_| BenchError::Usage(format!("--{name}: invalid item `{x}`")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAGS: [Flag; 4] = [
        opt("peaks", "LIST", Some("4,5"), "peaks"),
        opt("out", "DIR", None, "out"),
        many("set", "K=V", "sets"),
        switch("dry", "dry"),
    ];

    fn args(v: &[&str]) -> Result<Parsed> {
        parse(&FLAGS, v.iter().map(OsString::from).collect())
    }

    #[test]
    fn parses_defaults_lists_repeats_and_switches() {
        let Parsed::Args(a) = args(&["--out", "x", "--set", "a=1", "--set=b=2", "--dry"]).unwrap() else {
            panic!()
        };
        assert_eq!(a.list::<f64>("peaks").unwrap(), vec![4.0, 5.0]);
        assert_eq!(a.get("out"), Some("x"));
        assert_eq!(a.all("set"), vec!["a=1", "b=2"]);
        assert!(a.switch("dry"));
        assert!(!a.given("peaks"));
        let Parsed::Args(a) = args(&["--peaks", "10"]).unwrap() else {
            panic!()
        };
        assert_eq!(a.list::<u32>("peaks").unwrap(), vec![10]);
        assert!(a.required("out").is_err());
    }

    #[test]
    fn refuses_unknown_twice_and_bad_values() {
        assert!(args(&["--nope"]).is_err());
        assert!(args(&["--out", "a", "--out", "b"]).is_err());
        assert!(args(&["stray"]).is_err());
        let Parsed::Args(a) = args(&["--peaks", "4,x"]).unwrap() else {
            panic!()
        };
        assert!(a.list::<f64>("peaks").is_err());
        assert!(matches!(args(&["--help"]).unwrap(), Parsed::Help));
        assert!(usage("bench", "about", &FLAGS).contains("--set K=V"));
    }
}
