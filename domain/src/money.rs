//! Money as integer minor units with an ISO 4217 currency, parsed exactly from decimal text.

use std::fmt;

/// An ISO 4217 currency this catalog knows, with its minor digits and display symbol.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: &'static str,
    minor_digits: u8,
}

/// Active ISO 4217 codes and their minor digits. Codes missing here are rejected rather
/// than guessed at, because a wrong exponent silently scales every price by 10ⁿ.
const CURRENCIES: &[(&str, u8)] = &[
    ("AED", 2),
    ("AFN", 2),
    ("ALL", 2),
    ("AMD", 2),
    ("ANG", 2),
    ("AOA", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("AWG", 2),
    ("AZN", 2),
    ("BAM", 2),
    ("BBD", 2),
    ("BDT", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BIF", 0),
    ("BMD", 2),
    ("BND", 2),
    ("BOB", 2),
    ("BRL", 2),
    ("BSD", 2),
    ("BTN", 2),
    ("BWP", 2),
    ("BYN", 2),
    ("BZD", 2),
    ("CAD", 2),
    ("CDF", 2),
    ("CHF", 2),
    ("CLF", 4),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("CRC", 2),
    ("CUP", 2),
    ("CVE", 2),
    ("CZK", 2),
    ("DJF", 0),
    ("DKK", 2),
    ("DOP", 2),
    ("DZD", 2),
    ("EGP", 2),
    ("ERN", 2),
    ("ETB", 2),
    ("EUR", 2),
    ("FJD", 2),
    ("FKP", 2),
    ("GBP", 2),
    ("GEL", 2),
    ("GHS", 2),
    ("GIP", 2),
    ("GMD", 2),
    ("GNF", 0),
    ("GTQ", 2),
    ("GYD", 2),
    ("HKD", 2),
    ("HNL", 2),
    ("HTG", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("IQD", 3),
    ("IRR", 2),
    ("ISK", 0),
    ("JMD", 2),
    ("JOD", 3),
    ("JPY", 0),
    ("KES", 2),
    ("KGS", 2),
    ("KHR", 2),
    ("KMF", 0),
    ("KPW", 2),
    ("KRW", 0),
    ("KWD", 3),
    ("KYD", 2),
    ("KZT", 2),
    ("LAK", 2),
    ("LBP", 2),
    ("LKR", 2),
    ("LRD", 2),
    ("LSL", 2),
    ("LYD", 3),
    ("MAD", 2),
    ("MDL", 2),
    ("MGA", 2),
    ("MKD", 2),
    ("MMK", 2),
    ("MNT", 2),
    ("MOP", 2),
    ("MRU", 2),
    ("MUR", 2),
    ("MVR", 2),
    ("MWK", 2),
    ("MXN", 2),
    ("MYR", 2),
    ("MZN", 2),
    ("NAD", 2),
    ("NGN", 2),
    ("NIO", 2),
    ("NOK", 2),
    ("NPR", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PAB", 2),
    ("PEN", 2),
    ("PGK", 2),
    ("PHP", 2),
    ("PKR", 2),
    ("PLN", 2),
    ("PYG", 0),
    ("QAR", 2),
    ("RON", 2),
    ("RSD", 2),
    ("RUB", 2),
    ("RWF", 0),
    ("SAR", 2),
    ("SBD", 2),
    ("SCR", 2),
    ("SDG", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("SHP", 2),
    ("SLE", 2),
    ("SOS", 2),
    ("SRD", 2),
    ("SSP", 2),
    ("STN", 2),
    ("SVC", 2),
    ("SYP", 2),
    ("SZL", 2),
    ("THB", 2),
    ("TJS", 2),
    ("TMT", 2),
    ("TND", 3),
    ("TOP", 2),
    ("TRY", 2),
    ("TTD", 2),
    ("TWD", 2),
    ("TZS", 2),
    ("UAH", 2),
    ("UGX", 0),
    ("USD", 2),
    ("UYI", 0),
    ("UYU", 2),
    ("UYW", 4),
    ("UZS", 2),
    ("VES", 2),
    ("VND", 0),
    ("VUV", 0),
    ("WST", 2),
    ("XAF", 0),
    ("XCD", 2),
    ("XOF", 0),
    ("XPF", 0),
    ("YER", 2),
    ("ZAR", 2),
    ("ZMW", 2),
    ("ZWG", 2),
];

/// Symbols shoppers recognise; other currencies display as `CODE 12.34`.
const SYMBOLS: &[(&str, &str)] = &[
    ("USD", "$"),
    ("EUR", "€"),
    ("GBP", "£"),
    ("JPY", "¥"),
    ("CNY", "CN¥"),
    ("INR", "₹"),
    ("KRW", "₩"),
    ("CAD", "CA$"),
    ("AUD", "A$"),
    ("NZD", "NZ$"),
    ("HKD", "HK$"),
    ("MXN", "MX$"),
    ("BRL", "R$"),
    ("ILS", "₪"),
    ("VND", "₫"),
    ("PHP", "₱"),
    ("TWD", "NT$"),
];

impl Currency {
    pub const USD: Currency = Currency { code: "USD", minor_digits: 2 };

    pub fn parse(code: &str) -> Option<Currency> {
        CURRENCIES.iter().find(|(c, _)| *c == code).map(|&(code, minor_digits)| Currency { code, minor_digits })
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn minor_digits(&self) -> u8 {
        self.minor_digits
    }

    fn symbol(&self) -> Option<&'static str> {
        SYMBOLS.iter().find(|(c, _)| *c == self.code).map(|(_, s)| *s)
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

/// An amount in the currency's minor units (cents for USD, yen for JPY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    minor: i64,
    currency: Currency,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("{0:?} is not a plain decimal number (digits, optionally a point and more digits)")]
    NotDecimal(String),
    #[error("{0:?} is negative; prices must be ≥ 0")]
    Negative(String),
    #[error("{text:?} has more than {digits} decimal places, the most {currency} allows")]
    TooPrecise { text: String, digits: u8, currency: &'static str },
    #[error("{0:?} is too large to store")]
    TooLarge(String),
}

impl Money {
    pub fn from_minor(minor: i64, currency: Currency) -> Self {
        Self { minor, currency }
    }

    /// Parses the exact decimal text of a JSON number (`"999.99"`), never going through f64,
    /// so `0.1 + 0.2`-style drift cannot enter the catalog.
    pub fn parse(text: &str, currency: Currency) -> Result<Self, MoneyError> {
        if let Some(rest) = text.strip_prefix('-') {
            return Err(if is_plain_decimal(rest) {
                MoneyError::Negative(text.to_owned())
            } else {
                MoneyError::NotDecimal(text.to_owned())
            });
        }
        if !is_plain_decimal(text) {
            return Err(MoneyError::NotDecimal(text.to_owned()));
        }
        let (int_part, frac_part) = text.split_once('.').unwrap_or((text, ""));
        let significant_frac = frac_part.trim_end_matches('0');
        let digits = currency.minor_digits;
        if significant_frac.len() > digits as usize {
            return Err(MoneyError::TooPrecise { text: text.to_owned(), digits, currency: currency.code });
        }
        let too_large = || MoneyError::TooLarge(text.to_owned());
        let mut minor: i64 = 0;
        let padded = significant_frac.bytes().chain(std::iter::repeat(b'0')).take(digits as usize);
        for b in int_part.bytes().chain(padded) {
            minor = minor.checked_mul(10).and_then(|m| m.checked_add(i64::from(b - b'0'))).ok_or_else(too_large)?;
        }
        Ok(Self { minor, currency })
    }

    pub fn minor(&self) -> i64 {
        self.minor
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// The amount as decimal text with exactly the currency's minor digits (`"999.99"`, `"1200"`).
    pub fn amount_text(&self) -> String {
        let digits = u32::from(self.currency.minor_digits);
        let sign = if self.minor < 0 { "-" } else { "" };
        let abs = self.minor.unsigned_abs();
        if digits == 0 {
            return format!("{sign}{abs}");
        }
        let scale = 10u64.pow(digits);
        format!("{sign}{}.{:0width$}", abs / scale, abs % scale, width = digits as usize)
    }

    /// What a shopper reads: `$29.99`, `€29.99`, `¥1200`, `CHF 5.00`.
    pub fn display(&self) -> String {
        match self.currency.symbol() {
            Some(symbol) => format!("{symbol}{}", self.amount_text()),
            None => format!("{} {}", self.currency.code, self.amount_text()),
        }
    }
}

fn is_plain_decimal(s: &str) -> bool {
    let (int_part, frac_part) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    !int_part.is_empty()
        && int_part.bytes().all(|b| b.is_ascii_digit())
        && frac_part.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

/// Stored as `{"minor": 99999, "currency": "USD"}`: integers only, so no store ever rounds it.
impl serde::Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Money", 2)?;
        st.serialize_field("minor", &self.minor)?;
        st.serialize_field("currency", self.currency.code)?;
        st.end()
    }
}

impl<'de> serde::Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct Raw {
            minor: i64,
            currency: String,
        }
        let raw = Raw::deserialize(d)?;
        let currency = Currency::parse(&raw.currency)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown currency {:?}", raw.currency)))?;
        Ok(Money { minor: raw.minor, currency })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cur(code: &str) -> Currency {
        Currency::parse(code).unwrap()
    }

    #[test]
    fn parses_exact_minor_units() {
        assert_eq!(Money::parse("999.99", Currency::USD).unwrap().minor(), 99_999);
        assert_eq!(Money::parse("0", Currency::USD).unwrap().minor(), 0);
        assert_eq!(Money::parse("29.9", Currency::USD).unwrap().minor(), 2_990);
        assert_eq!(Money::parse("29.990", Currency::USD).unwrap().minor(), 2_999);
        assert_eq!(Money::parse("1200", cur("JPY")).unwrap().minor(), 1_200);
        assert_eq!(Money::parse("1.234", cur("KWD")).unwrap().minor(), 1_234);
        // 0.1 + 0.2 style values stay exact because f64 is never involved.
        assert_eq!(Money::parse("0.29", Currency::USD).unwrap().minor(), 29);
    }

    #[test]
    fn rejects_what_the_contract_rejects() {
        assert!(matches!(Money::parse("-1", Currency::USD), Err(MoneyError::Negative(_))));
        assert!(matches!(Money::parse("1e400", Currency::USD), Err(MoneyError::NotDecimal(_))));
        assert!(matches!(Money::parse("abc", Currency::USD), Err(MoneyError::NotDecimal(_))));
        assert!(matches!(Money::parse("0.001", Currency::USD), Err(MoneyError::TooPrecise { .. })));
        assert!(matches!(Money::parse("1.5", cur("JPY")), Err(MoneyError::TooPrecise { .. })));
        assert!(matches!(Money::parse("99999999999999999999", Currency::USD), Err(MoneyError::TooLarge(_))));
        for bad in ["", ".5", "5.", "1.2.3", "+1", "1E2", " 1"] {
            assert!(Money::parse(bad, Currency::USD).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn displays_with_symbol_and_minor_digits() {
        assert_eq!(Money::parse("29.99", Currency::USD).unwrap().display(), "$29.99");
        assert_eq!(Money::parse("29.99", cur("EUR")).unwrap().display(), "€29.99");
        assert_eq!(Money::parse("5", cur("GBP")).unwrap().display(), "£5.00");
        assert_eq!(Money::parse("1200", cur("JPY")).unwrap().display(), "¥1200");
        assert_eq!(Money::parse("5.5", cur("CHF")).unwrap().display(), "CHF 5.50");
        assert_eq!(Money::parse("0.05", Currency::USD).unwrap().amount_text(), "0.05");
    }

    #[test]
    fn unknown_currency_codes_are_rejected() {
        for bad in ["usd", "US", "XXX", "ABC", ""] {
            assert!(Currency::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn serde_round_trip_keeps_integers() {
        let m = Money::parse("999.99", Currency::USD).unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"minor":99999,"currency":"USD"}"#);
        assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), m);
    }
}
