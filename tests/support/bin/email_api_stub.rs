//! The demo's stand-in for the email API: serves `POST /emails` on the address given (default
//! 127.0.0.1:8025), accepts the key in `SWITCHYARD_EMAIL_API_KEY`, and prints one line per
//! email it accepts until it is stopped.

use switchyard_tests::email::EmailApi;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8025".into()).parse()?;
    let key = std::env::var("SWITCHYARD_EMAIL_API_KEY")
        .map_err(|_| anyhow::anyhow!("set SWITCHYARD_EMAIL_API_KEY to the key the stub accepts"))?;
    let api = EmailApi::start_on(addr, &key, true).await?;
    println!("email API stub listening on {}", api.base_url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
