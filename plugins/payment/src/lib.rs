//! The order saga's payment service, with a documented rule standing in for a payment
//! provider: an amount up to `slow_over` (config, default 50000 cents) succeeds at once; up to
//! `limit` (default 100000) it succeeds after `slow_delay_ms` (default 60000), like a provider
//! that takes its time; over `limit` it fails. A repeated charge answers what the first did;
//! `payment.refund` refunds a succeeded payment once.

use flows::orders::*;
use serde::{Deserialize, Serialize};
use switchyard_sdk::{Collection, Error, Event, Metadata, Outgoing, Plugin, Result, config, log, publish};

/// One payment per order, keyed by order id.
static PAYMENTS: Collection<Payment> = Collection::new("payments");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Succeeded,
    Failed,
    Refunded,
}

#[derive(Debug, Serialize, Deserialize)]
struct Payment {
    amount: u64,
    outcome: Outcome,
}

fn charge(event: &Event) -> Result<()> {
    let charge: Charge = event.json()?;
    let key = charge.order_id.to_string();
    if let Some(payment) = PAYMENTS.get(&key)? {
        let name = if payment.outcome == Outcome::Failed { PAYMENT_FAILED } else { PAYMENT_SUCCEEDED };
        publish(name, &OrderRef::new(&charge.order_id))?;
        log::debug!("order {key}: repeated charge answered {name}");
        return Ok(());
    }
    let limit = config::parse_or("limit", 100_000u64)?;
    let (outcome, delay) = if charge.amount > limit {
        (Outcome::Failed, 0)
    } else if charge.amount > config::parse_or("slow_over", 50_000u64)? {
        (Outcome::Succeeded, config::parse_or("slow_delay_ms", 60_000u64)?)
    } else {
        (Outcome::Succeeded, 0)
    };
    let answer = match outcome {
        Outcome::Failed => Outgoing::new(
            PAYMENT_FAILED,
            &OrderRef::because(&charge.order_id, format!("amount {} is over the limit of {limit}", charge.amount)),
        )?,
        _ => Outgoing::new(PAYMENT_SUCCEEDED, &OrderRef::new(&charge.order_id))?.delay_ms(delay),
    };
    answer.send()?;
    PAYMENTS.put(&key, &Payment { amount: charge.amount, outcome })?;
    log::debug!("order {key}: {outcome:?}");
    Ok(())
}

fn refund(event: &Event) -> Result<()> {
    let order: OrderRef = event.json()?;
    let key = order.order_id.to_string();
    match PAYMENTS.get(&key)? {
        Some(payment) if payment.outcome == Outcome::Succeeded => {
            PAYMENTS.put(&key, &Payment { outcome: Outcome::Refunded, ..payment })?;
            publish(PAYMENT_REFUNDED, &OrderRef::new(&order.order_id))?;
            log::debug!("order {key}: refunded");
            Ok(())
        }
        _ => {
            log::debug!("order {key}: nothing to refund");
            Ok(())
        }
    }
}

struct PaymentService;

impl Plugin for PaymentService {
    fn metadata() -> Metadata {
        Metadata::new("payment", env!("CARGO_PKG_VERSION"))
            .subscribe([PAYMENT_INITIATE, PAYMENT_REFUND])
            .ordering_key(["orderId"])
    }

    fn handle(event: Event) -> Result<()> {
        match event.name.as_str() {
            PAYMENT_INITIATE => charge(&event),
            PAYMENT_REFUND => refund(&event),
            other => Err(Error::reject(format!("no handler for {other}"))),
        }
    }
}

switchyard_sdk::plugin!(PaymentService);
