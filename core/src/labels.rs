//! Metric-label enums declared once: each variant next to its label text, with `ALL` for the
//! code that pre-creates every label value (dashboards see zeros, not gaps).

/// Declares a fieldless enum whose variants are metric labels:
/// `label_enum! { pub enum Kind { Commit => "commit", … } }` gives the enum (Copy, Eq, Ord,
/// Hash, Debug), `Kind::ALL` in declaration order and `Kind::as_str`.
#[macro_export]
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $label:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label text.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $label ),+
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    label_enum! {
        enum Colour {
            Red => "red",
            /// Documented variants keep their docs.
            Green => "green",
        }
    }

    #[test]
    fn all_and_labels() {
        assert_eq!(Colour::ALL, &[Colour::Red, Colour::Green]);
        assert_eq!(Colour::Green.as_str(), "green");
    }
}
