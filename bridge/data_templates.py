"""Built-in text dialogues: short task-oriented phone calls with random fill-ins.

Each template is a few lines `U: ...` (the caller) and `A: ...` (the assistant) with
`{slot}` fill-ins; a slot used twice in one template gets the same value, so the call stays
consistent. Forty templates times the slot pools give many thousand distinct dialogues:
enough variety of words and lengths for turn-taking data (the point is timing, not facts).
"""

from __future__ import annotations

import string

import numpy as np

from .data_dialogues import Dialogue, Turn

__all__ = ["TEMPLATES", "SLOTS", "template_dialogue"]


def _money(rng: np.random.Generator) -> str:
    dollars, cents = int(rng.integers(4, 90)), int(rng.choice([0, 25, 50, 75, 99]))
    return f"{dollars} dollars" + (f" and {cents} cents" if cents else "")


# Slot pools: a list to choose from, or a function of the generator.
SLOTS: dict[str, object] = {
    "name": ["Sarah", "James", "Maria", "David", "Chen", "Priya", "Tom", "Olivia", "Ahmed", "Emma",
             "Lucas", "Grace", "Daniel", "Fatima", "Noah", "Hannah"],
    "surname": ["Miller", "Johnson", "Garcia", "Patel", "Brown", "Nguyen", "Wilson", "Kim", "Lopez",
                "Taylor", "Schmidt", "Okafor"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "time": ["six thirty", "seven o'clock", "eight fifteen", "noon", "half past five", "nine in the morning",
             "two in the afternoon", "quarter to eight", "ten thirty"],
    "people": ["two", "three", "four", "five", "six", "eight"],
    "city": ["Boston", "Denver", "Seattle", "Chicago", "Austin", "Portland", "Atlanta", "Phoenix", "Dublin",
             "Toronto"],
    "weather": ["sunny", "cloudy with light rain", "windy and cool", "clear", "showery", "foggy in the morning",
                "snowy", "warm and humid"],
    "temp": lambda rng: str(int(rng.integers(35, 95))),
    "order": lambda rng: " ".join(str(int(d)) for d in rng.integers(0, 10, 6)),
    "money": _money,
    "minutes": ["ten", "fifteen", "twenty", "thirty", "forty five"],
    "restaurant": ["Luigi's", "The Blue Door", "Golden Dragon", "Casa Verde", "The Olive Tree", "Harbor Grill"],
    "pizza": ["a large pepperoni pizza", "two margherita pizzas", "a medium veggie pizza and garlic bread",
              "a small ham and pineapple pizza", "a family size meat lovers pizza"],
    "street": ["Maple Street", "Oak Avenue", "Station Road", "Park Lane", "Elm Drive", "River Road"],
    "house": lambda rng: str(int(rng.integers(2, 240))),
    "store": ["the hardware store", "City Books", "Green Grocers", "the pharmacy", "Bright Electronics"],
    "hours_open": ["eight", "nine", "ten"],
    "hours_close": ["five", "six", "eight", "nine"],
    "product": ["a coffee machine", "running shoes", "a winter jacket", "a phone charger", "a desk lamp",
                "headphones"],
    "doctor": ["Doctor Lee", "Doctor Harris", "Doctor Shah", "Doctor Moreno"],
    "movie": ["The Long Road", "Night Harbor", "Star Garden", "The Last Summer"],
    "airline": ["Sky Air", "Blue Lines", "Northwind"],
    "flight": lambda rng: f"{rng.choice(list('ABNS'))} {int(rng.integers(100, 999))}",
    "month": ["January", "March", "May", "July", "September", "November"],
    "date": lambda rng: ["first", "third", "fifth", "tenth", "twelfth", "fifteenth", "twentieth",
                         "twenty second"][int(rng.integers(0, 8))],
}

TEMPLATES: dict[str, str] = {
    "restaurant_booking": """
A: Good evening, {restaurant}, how can I help you?
U: Hi, I'd like to book a table for {people} on {day} at {time}, please.
A: Let me check for you. Yes, we have a table for {people} on {day} at {time}. Can I have a name for the booking?
U: It's {name} {surname}.
A: Thank you, {name}. Your table is booked, and we look forward to seeing you on {day}.""",
    "restaurant_full": """
U: Hello, do you have a table for {people} tonight at {time}?
A: I'm sorry, we are fully booked at {time} tonight, but I could offer you a table at nine or tomorrow evening.
U: Nine is fine, thank you.
A: Wonderful, a table for {people} at nine tonight. What name should I put it under?
U: {surname}, please.
A: All set. See you tonight.""",
    "opening_hours": """
A: Thanks for calling {store}. What can I do for you?
U: Hi, what time are you open on {day}?
A: On {day} we open at {hours_open} in the morning and close at {hours_close} in the evening.
U: Great, thanks a lot.
A: You're welcome. Have a nice day.""",
    "holiday_hours": """
U: Hello, are you open on the public holiday next {day}?
A: Yes, we are open on the holiday, but with shorter hours, from {hours_open} until three in the afternoon.
U: Okay, and do you have parking?
A: There is free parking behind the building, and more spaces on {street}.""",
    "pizza_order": """
A: {restaurant} pizza, what would you like to order?
U: I'd like {pizza} for delivery, please.
A: Sure. That comes to {money}. What is the delivery address?
U: {house} {street}.
A: Thank you. Your order will arrive in about {minutes} minutes.
U: Perfect, thank you.""",
    "pizza_pickup": """
U: Hi, can I order {pizza} for pick up?
A: Of course. It will be ready in {minutes} minutes, and the total is {money}. Can I have your name?
U: {name}.
A: Thanks {name}, see you soon.""",
    "weather_today": """
U: What's the weather like in {city} today?
A: Today in {city} it will be {weather}, with a high of {temp} degrees.
U: Do I need an umbrella this afternoon?
A: There is a small chance of rain in the late afternoon, so taking an umbrella would be wise.""",
    "weather_weekend": """
U: Can you tell me the forecast for {city} this weekend?
A: This weekend in {city} looks {weather}. Saturday reaches about {temp} degrees, and Sunday will be a little cooler.
U: Thanks, that helps with my plans.
A: Glad to help. Enjoy your weekend.""",
    "taxi": """
A: City Cabs, where can we pick you up?
U: I need a taxi from {house} {street} to the train station.
A: A car will be with you in about {minutes} minutes. Is that okay?
U: Yes, that's fine.
A: Great. The driver will call you when they arrive.""",
    "doctor_appointment": """
A: Good morning, {street} medical practice, how can I help?
U: Hello, I'd like to make an appointment with {doctor}, please.
A: The next free appointment with {doctor} is on {day} at {time}. Would that suit you?
U: Yes, that works for me.
A: Lovely. May I have your full name and date of birth?
U: {name} {surname}, born on the {date} of {month}.
A: Thank you, you are booked in for {day} at {time}.""",
    "dentist_reschedule": """
U: Hi, I have a dentist appointment on {day} and I need to move it.
A: No problem. Can I have your name, please?
U: {name} {surname}.
A: Thank you. I can move you to the following {day} at {time}, or to Friday morning.
U: The following {day} is good.
A: Done. Your new appointment is on {day} at {time}.""",
    "hotel_booking": """
A: Hello, {city} Grand Hotel, reservations speaking.
U: Hi, do you have a double room for two nights from the {date} of {month}?
A: Yes, we do. A double room is {money} per night, breakfast included.
U: Great, I'll take it.
A: Wonderful. Could you spell your last name for me?
U: It's {surname}.
A: Thank you, your room is reserved for two nights.""",
    "package_tracking": """
A: Parcel service, how may I help you today?
U: I'm calling about a package that hasn't arrived yet.
A: I can check that for you. What is the tracking number?
U: It's {order}.
A: Thank you. Your package is at the local depot and will be delivered on {day} before {time}.
U: Okay, thanks.""",
    "order_status": """
U: Hello, I ordered {product} last week and I wanted to know when it ships.
A: Let me look that up. Can you give me your order number?
U: Sure, it's {order}.
A: Your order shipped this morning and should reach you by {day}.""",
    "return_item": """
A: Customer service, how can I help?
U: Hi, I'd like to return {product} I bought last month.
A: Of course. You can return it within sixty days for a full refund. Do you still have the receipt?
U: Yes, I have it here.
A: Perfect. Bring the item and the receipt to any of our stores, or we can send you a free return label.
U: A return label would be great.
A: I have sent the label to the email address on your account.""",
    "cinema_tickets": """
U: Hi, I'd like two tickets for {movie} on {day} evening.
A: {movie} is showing on {day} at seven and at nine thirty. Which one would you like?
U: Seven, please.
A: Two tickets for seven o'clock come to {money}. Shall I book them?
U: Yes, please.
A: Done. Your tickets will be waiting at the box office.""",
    "hair_salon": """
A: Good afternoon, Style Studio, how can I help?
U: Hi, can I book a haircut for {day}?
A: We have openings on {day} at {time} or at four. Which would you prefer?
U: {time} sounds good.
A: Great, you're booked for {day} at {time}. What's your name?
U: {name}.
A: See you then, {name}.""",
    "car_repair": """
U: Hello, my car is making a strange noise when I brake. Can you take a look?
A: Certainly. We can inspect it on {day} morning. Could you drop it off at eight?
U: Yes, I can do that. How long will it take?
A: An inspection takes about an hour, and we will call you before doing any repairs.""",
    "train_times": """
U: When is the next train to {city}?
A: The next train to {city} leaves at {time} from platform four, and the one after that is an hour later.
U: How long is the journey?
A: The journey takes about two hours and twenty minutes.""",
    "flight_status": """
A: {airline} customer line, how can I help you?
U: Hi, is flight {flight} to {city} on time?
A: Flight {flight} to {city} is delayed by {minutes} minutes. The new departure time is {time}.
U: Oh no. Will I still make my connection?
A: Your connection has a comfortable transfer time, so you should make it without any trouble.""",
    "pharmacy": """
U: Hi, I'm calling to check if my prescription is ready.
A: Sure, can I have your name and date of birth?
U: {name} {surname}, the {date} of {month}.
A: Thank you. Your prescription is ready, and you can pick it up any time before {hours_close} today.""",
    "library": """
A: {city} public library, how can I help?
U: Hello, I'd like to renew the books I borrowed.
A: I can do that. What is your library card number?
U: It's {order}.
A: Thank you. Your three books are renewed for another three weeks.
U: Great, thanks.""",
    "internet_outage": """
A: Technical support, what seems to be the problem?
U: My internet has been down since this morning.
A: I'm sorry to hear that. There is a known outage in your area, and our engineers expect to fix it by {time}.
U: Is there anything I can do in the meantime?
A: You could restart your router once the service is back, and call us again if it still does not work.""",
    "change_address": """
U: Hi, I moved recently and I need to update my address.
A: Of course. What is your new address?
U: {house} {street}, {city}.
A: Thank you. I have updated your address to {house} {street}, {city}. Is there anything else?
U: No, that's all.
A: Have a great day.""",
    "cancel_subscription": """
U: Hello, I'd like to cancel my magazine subscription.
A: I can help with that. May I ask why you would like to cancel?
U: I just don't have time to read it anymore.
A: I understand. Your subscription is cancelled, and you will receive the final issue next month.""",
    "gym_membership": """
A: Fit Life gym, how can I help you today?
U: Hi, how much is a monthly membership?
A: A monthly membership is {money}, and it includes all classes and the swimming pool.
U: Is there a joining fee?
A: There is no joining fee this month, so it's a good time to sign up.""",
    "plumber": """
U: Hello, I have a leaking pipe under my kitchen sink. Can someone come today?
A: Our plumber can be there between two and four this afternoon. What is the address?
U: {house} {street}.
A: Thank you. Please turn off the water under the sink until the plumber arrives.""",
    "vegetarian_menu": """
U: Hi, do you have vegetarian options on your menu?
A: Yes, we have several vegetarian dishes, including a mushroom risotto, a vegetable curry and a grilled halloumi salad.
U: And are any of them vegan?
A: The vegetable curry is vegan, and we can make the risotto without cheese.""",
    "concert_tickets": """
U: Are there still tickets for the concert on {day}?
A: Yes, there are a few seats left in the balcony at {money} each.
U: Can I reserve two?
A: Certainly. Two balcony seats are reserved under your phone number, and you can pay at the door.""",
    "parking": """
U: Hi, is there parking near the {city} convention center?
A: Yes, there is a parking garage on {street}, right next to the center. It costs {money} for the day.
U: Does it fill up early?
A: On event days it is often full by nine, so we recommend arriving early or taking the train.""",
    "lost_and_found": """
U: Hello, I think I left my umbrella on the bus this morning.
A: I'm sorry to hear that. Which bus were you on, and at what time?
U: The number {people} bus, at about {time}.
A: An umbrella was handed in from that bus. You can collect it at the main station office until {hours_close}.""",
    "bank_card": """
A: Thank you for calling the bank. How can I help you?
U: I think I lost my bank card. Can you block it?
A: Of course. For security, can you confirm your full name and date of birth?
U: {name} {surname}, the {date} of {month}.
A: Thank you. Your card is now blocked, and a new one will arrive within five working days.""",
    "store_directions": """
U: Hi, how do I get to your store from the station?
A: From the station, walk down {street} for about five minutes, and we are on the left, next to the bakery.
U: Is it easy to find?
A: Yes, look for the big green sign above the door.""",
    "vet_appointment": """
A: Happy Paws vet clinic, how can I help?
U: Hi, my dog has been limping since yesterday. Can I bring him in?
A: We can see him today at {time}. Please bring any medication he is taking.
U: Thank you, we'll be there.""",
    "moving_van": """
U: Hi, I'd like to rent a moving van for {day}.
A: We have a medium van available on {day} for {money} for the whole day, including insurance.
U: That sounds fine. What time can I pick it up?
A: You can pick it up from eight in the morning and return it by six in the evening.""",
    "school_absence": """
U: Good morning, I'm calling because my son is sick and won't be in school today.
A: Thank you for letting us know. What is your son's name and class?
U: {name} {surname}, in class four.
A: I have noted the absence. We hope he feels better soon.""",
    "recycling": """
U: Hello, when is the recycling collected on {street}?
A: Recycling on {street} is collected every other {day}, and the next collection is this week.
U: Can I put out cardboard boxes?
A: Yes, please flatten the boxes and put them next to the blue bin.""",
    "museum": """
U: Hi, how much are tickets for the museum?
A: Adult tickets are {money}, and children under twelve go in free.
U: Are you open late on {day}?
A: Yes, on {day} the museum stays open until nine in the evening.""",
    "insurance_claim": """
A: Claims department, how can I help?
U: Hi, I need to report a small accident with my car.
A: I'm sorry to hear that. Is everyone okay?
U: Yes, everyone is fine, it was just a scratch in a parking lot.
A: Good. I'll open a claim for you, and an adjuster will call you by {day} to arrange an inspection.""",
    "wake_up_call": """
U: Hello, could I have a wake up call tomorrow morning?
A: Of course. What time would you like the call?
U: At {time}, please.
A: A wake up call is set for {time} tomorrow. Is there anything else I can do for you?
U: No, thank you, good night.
A: Good night.""",
}

_FORMATTER = string.Formatter()


def _fill(slot: str, rng: np.random.Generator) -> str:
    pool = SLOTS[slot]
    if callable(pool):
        return pool(rng)
    return pool[int(rng.integers(0, len(pool)))]


def template_dialogue(rng: np.random.Generator) -> Dialogue:
    """One dialogue: a template chosen at random, its slots filled at random."""
    names = sorted(TEMPLATES)
    name = names[int(rng.integers(0, len(names)))]
    text = TEMPLATES[name]
    slots = sorted({field for _, field, _, _ in _FORMATTER.parse(text) if field})
    values = {slot: _fill(slot, rng) for slot in slots}
    turns = []
    for line in text.strip().splitlines():
        tag, _, body = line.partition(": ")
        turns.append(Turn("user" if tag == "U" else "assistant", body.format(**values)))
    return Dialogue(tuple(turns), f"template:{name}")
