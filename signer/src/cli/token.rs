//! `signet token init|keygen|list|pubkey`.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use signet_pkcs11::{
    KeyGenOptions, KeyType, Pin, PinSource, Profile, Token, TokenConfig, TokenSelector, init_token,
    list_slots,
};

use super::CliError;

/// Token options shared by the `token` subcommands (each also read from the environment).
#[derive(Debug, Args)]
pub struct TokenCli {
    /// Path of the PKCS#11 module.
    #[arg(long, global = true, env = "SIGNET_PKCS11_MODULE", default_value = signet_pkcs11::DEFAULT_MODULE)]
    module: PathBuf,
    /// Label of the token to use.
    #[arg(long, global = true, env = "SIGNET_TOKEN")]
    token: Option<String>,
    /// Serial number of the token to use (instead of --token).
    #[arg(long, global = true, conflicts_with = "token")]
    token_serial: Option<String>,
    /// File holding the user PIN (else the SIGNET_PIN environment variable, else a prompt).
    #[arg(long, global = true, env = "SIGNET_PIN_FILE")]
    pin_file: Option<PathBuf>,
    /// Token profile (softhsm2, tpm2, generic); detected when omitted.
    #[arg(long, global = true)]
    profile: Option<String>,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Initialise a token in a free slot: sets its label, SO PIN and user PIN.
    Init {
        /// The new token's label (default: --token / SIGNET_TOKEN).
        #[arg(long)]
        label: Option<String>,
        /// File holding the SO PIN (else the SIGNET_SO_PIN environment variable, else a prompt).
        #[arg(long, env = "SIGNET_SO_PIN_FILE")]
        so_pin_file: Option<PathBuf>,
    },
    /// Generate a key pair on the token (the private key never leaves it).
    Keygen {
        /// The key's label.
        #[arg(long)]
        label: String,
        /// The key type.
        #[arg(long, value_enum)]
        key_type: KeyTypeArg,
        /// Replace an existing key with the same label.
        #[arg(long)]
        replace: bool,
    },
    /// List slots and tokens, and the keys on the selected token (--token / SIGNET_TOKEN).
    List,
    /// Print a key's public key (SubjectPublicKeyInfo).
    Pubkey {
        /// The key's label.
        #[arg(long)]
        label: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Pem)]
        format: Format,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KeyTypeArg {
    EcP256,
    EcP384,
    #[value(name = "rsa-2048")]
    Rsa2048,
    #[value(name = "rsa-3072")]
    Rsa3072,
    #[value(name = "rsa-4096")]
    Rsa4096,
    Ed25519,
}

impl From<KeyTypeArg> for KeyType {
    fn from(k: KeyTypeArg) -> KeyType {
        match k {
            KeyTypeArg::EcP256 => KeyType::EcP256,
            KeyTypeArg::EcP384 => KeyType::EcP384,
            KeyTypeArg::Rsa2048 => KeyType::Rsa2048,
            KeyTypeArg::Rsa3072 => KeyType::Rsa3072,
            KeyTypeArg::Rsa4096 => KeyType::Rsa4096,
            KeyTypeArg::Ed25519 => KeyType::Ed25519,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Pem,
    Der,
}

impl TokenCli {
    fn pin_source(&self, what: &str) -> PinSource {
        if let Some(f) = &self.pin_file {
            PinSource::File(f.clone())
        } else if std::env::var_os("SIGNET_PIN").is_some() {
            PinSource::Env("SIGNET_PIN".into())
        } else {
            PinSource::Prompt(format!("User PIN for {what}: "))
        }
    }

    fn selector(&self) -> Option<TokenSelector> {
        match (&self.token, &self.token_serial) {
            (_, Some(s)) => Some(TokenSelector::Serial(s.clone())),
            (Some(l), None) => Some(TokenSelector::Label(l.clone())),
            (None, None) => None,
        }
    }

    fn open(&self) -> Result<Token, CliError> {
        let token = self.selector().ok_or_else(|| {
            CliError::new(
                "no token selected: pass --token LABEL (or --token-serial), or set SIGNET_TOKEN",
            )
        })?;
        let profile = self
            .profile
            .as_deref()
            .map(str::parse::<Profile>)
            .transpose()?;
        let pin = self.pin_source(&token.to_string());
        Ok(Token::open(&TokenConfig {
            module: self.module.clone(),
            token,
            pin,
            profile,
        })?)
    }
}

/// Runs a `signet token` subcommand.
pub fn run(cli: TokenCli) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match &cli.command {
        TokenCommand::Init { label, so_pin_file } => {
            let label = label
                .clone()
                .or_else(|| cli.token.clone())
                .ok_or_else(|| CliError::new("init needs --label (or --token / SIGNET_TOKEN)"))?;
            let so_pin = match so_pin_file {
                Some(f) => PinSource::File(f.clone()),
                None if std::env::var_os("SIGNET_SO_PIN").is_some() => {
                    PinSource::Env("SIGNET_SO_PIN".into())
                }
                None => PinSource::Prompt(format!("New SO PIN for token {label:?}: ")),
            }
            .resolve()?;
            let user_pin: Pin = cli.pin_source(&format!("new token {label:?}")).resolve()?;
            let slot = init_token(&cli.module, &label, &so_pin, &user_pin)?;
            let serial = slot.token.map(|t| t.serial).unwrap_or_default();
            writeln!(
                stdout,
                "initialised token {label:?} (serial {serial}) in slot {}",
                slot.slot_id
            )?;
        }
        TokenCommand::Keygen {
            label,
            key_type,
            replace,
        } => {
            let token = cli.open()?;
            let mut session = token.session()?;
            let key_type = KeyType::from(*key_type);
            let info =
                session.generate_key(label, key_type, KeyGenOptions { replace: *replace })?;
            writeln!(
                stdout,
                "generated {key_type} key {label:?} (id {})",
                hex::encode(&info.id)
            )?;
        }
        TokenCommand::List => {
            for slot in list_slots(&cli.module)? {
                match &slot.token {
                    None => writeln!(
                        stdout,
                        "slot {}: {} (no token)",
                        slot.slot_id, slot.description
                    )?,
                    Some(t) if !t.initialized => {
                        writeln!(stdout, "slot {}: uninitialised token (free)", slot.slot_id)?
                    }
                    Some(t) => writeln!(
                        stdout,
                        "slot {}: token {:?} serial {} ({} {})",
                        slot.slot_id, t.label, t.serial, t.manufacturer, t.model
                    )?,
                }
            }
            if cli.selector().is_some() {
                let token = cli.open()?;
                let mut session = token.session()?;
                let keys = session.list_keys()?;
                writeln!(
                    stdout,
                    "keys on token {:?} (profile {}): {}",
                    token.summary().label,
                    token.profile().name(),
                    keys.len()
                )?;
                for k in keys {
                    let kt = k.key_type.map_or("unknown", KeyType::name);
                    let public = if k.has_public {
                        ""
                    } else {
                        " (no public key object)"
                    };
                    writeln!(
                        stdout,
                        "  {:<24} {:<9} id {}{public}",
                        k.label,
                        kt,
                        hex::encode(&k.id)
                    )?;
                }
            }
        }
        TokenCommand::Pubkey { label, format, out } => {
            let token = cli.open()?;
            let der = token.session()?.public_key_der(label)?;
            let bytes = match format {
                Format::Der => der,
                Format::Pem => pem::encode(&pem::Pem::new("PUBLIC KEY", der)).into_bytes(),
            };
            match out {
                Some(path) => std::fs::write(path, &bytes)?,
                None => stdout.write_all(&bytes)?,
            }
        }
    }
    stdout.flush()?;
    Ok(())
}
