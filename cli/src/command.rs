//! `trackgate command`: sends one command to a device through the pool's Redis command stream
//! and waits for its final status in the responses stream.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use trackgate_api::redis_layout::{self as layout, CommandStatus, command_field as field};

#[derive(clap::Args)]
pub(crate) struct CommandArgs {
    /// Redis URL of the pool's sink.
    #[arg(
        long,
        env = "TRACKGATE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    redis_url: String,
    /// The pool.
    #[arg(long)]
    pool: String,
    /// Key prefix (the pool's `redis.streamPrefix`).
    #[arg(long, default_value = "trackgate")]
    prefix: String,
    /// The device.
    #[arg(long)]
    imei: String,
    /// 12, or 14 (carries the IMEI: the device refuses a command meant for another one).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u8).range(12..=14))]
    codec: u8,
    /// Time to live in seconds: an offline device gets the command if it logs in before.
    #[arg(long)]
    ttl: Option<u64>,
    /// The command's id (default: generated).
    #[arg(long)]
    id: Option<String>,
    /// COMMAND is a raw payload in hex, not text.
    #[arg(long)]
    hex: bool,
    /// Queue only: print the id and return.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for a final status (default: the TTL plus a minute).
    #[arg(long)]
    wait_seconds: Option<u64>,
    /// The command, e.g. `getinfo`, `getver`, `setdigout 1`.
    command: String,
}

pub(crate) fn run(args: CommandArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(send(args))
}

async fn send(args: CommandArgs) -> anyhow::Result<()> {
    if args.codec == 13 {
        bail!("--codec is 12 or 14");
    }
    let client = redis::Client::open(args.redis_url.as_str()).context("redis URL")?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("connecting to {}", args.redis_url))?;
    let id = args.id.clone().unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("cli-{nanos:x}")
    });
    let codec = args.codec.to_string();
    let ttl = args.ttl.unwrap_or(layout::DEFAULT_COMMAND_TTL_SECONDS);
    let ttl_text = ttl.to_string();
    let body = if args.hex {
        field::PAYLOAD
    } else {
        field::COMMAND
    };
    let fields = [
        (field::ID, id.as_str()),
        (field::IMEI, args.imei.as_str()),
        (body, args.command.as_str()),
        (field::CODEC, codec.as_str()),
        (field::TTL, ttl_text.as_str()),
    ];
    let entry: String = conn
        .xadd(layout::commands_key(&args.prefix, &args.pool), "*", &fields)
        .await
        .context("XADD to the command stream")?;
    if args.no_wait {
        println!("{id}");
        return Ok(());
    }
    // Responses come after the command's entry on the same Redis clock; starting a
    // millisecond earlier never misses one written in the same millisecond.
    let ms: u64 = entry
        .split('-')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let mut last = format!("{}-0", ms.saturating_sub(1));
    let responses = layout::command_responses_key(&args.prefix, &args.pool);
    let wait = Duration::from_secs(args.wait_seconds.unwrap_or(ttl + 60));
    let started = Instant::now();
    let options = StreamReadOptions::default().count(100).block(1000);
    while started.elapsed() < wait {
        let reply: Option<StreamReadReply> = conn
            .xread_options(&[&responses], &[&last], &options)
            .await
            .context("reading the responses stream")?;
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            last.clone_from(&entry.id);
            let get = |name: &str| entry.get::<String>(name).unwrap_or_default();
            if get(field::ID) != id {
                continue;
            }
            let status = get(field::STATUS);
            match CommandStatus::parse(&status) {
                Some(CommandStatus::Answered) => {
                    println!("{}", get(field::ANSWER));
                    return Ok(());
                }
                Some(s) if s.is_final() => {
                    bail!("command {id} {status}: {}", get(field::REASON))
                }
                _ => eprintln!("command {id} {status}"),
            }
        }
    }
    bail!("command {id}: no final status within {wait:?}")
}
