"""The demo's own sample corpus: six short articles about a made-up valley, and questions whose
answers need two of them. Written for this project; nothing is downloaded."""

DOCUMENTS = {
    "harbor": (
        "Port Alder is a small harbour town at the mouth of the Vesk river. It was founded in "
        "1712 by fishermen from the northern islands, who built the first stone pier from granite "
        "quarried in the hills above the town. Today Port Alder has about nine thousand "
        "residents. Its economy rests on fishing, a ferry line to the islands, and a growing "
        "number of summer visitors who come for the lighthouse and the old market hall. The town "
        "council meets in the market hall on the first Monday of every month. The best known "
        "building in Port Alder is the Greywater Lighthouse, which stands on the end of the stone "
        "pier and has guided boats into the river mouth for more than two centuries."
    ),
    "lighthouse": (
        "The Greywater Lighthouse was designed by the engineer Miriam Osk and completed in 1798. "
        "It is twenty-six metres tall and its lamp, first fuelled by whale oil and later by "
        "kerosene, was converted to electricity in 1931. The tower is painted in red and white "
        "bands so that sailors can recognise it by day. Osk insisted on a spiral staircase of "
        "exactly 131 steps, one for each sailor lost in the storm of 1779. The lighthouse has been "
        "automated since 1987 and is now a museum run by volunteers; visitors may climb to the "
        "lantern room between May and September. A bronze plaque at the door lists the names of "
        "every keeper who served there."
    ),
    "engineer": (
        "Miriam Osk was born in 1761 in the mountain village of Tarn Hollow, the daughter of a "
        "clockmaker. She taught herself mathematics from her father's books and at nineteen "
        "travelled to the capital to study with the bridge builder Anselm Rook. Her first "
        "commission was a footbridge over the Vesk gorge. She later designed three lighthouses "
        "along the western coast, canals for the salt works at Brenmouth, and a water mill that "
        "is still in use. Osk never married. In old age she returned to Tarn Hollow, where she "
        "died in 1840 and was buried beside her father. Her notebooks are kept in the "
        "valley archive."
    ),
    "river": (
        "The Vesk is a river of about one hundred and forty kilometres that rises in the Tarn "
        "mountains and reaches the sea at Port Alder. In its upper course it cuts the narrow Vesk "
        "gorge, crossed by a footbridge built in the 1780s. Below the gorge the river widens and "
        "feeds the salt marshes of Brenmouth. Salmon run up the Vesk every autumn, and the river "
        "is known for its sudden spring floods, which in 1853 destroyed half of the wooden houses "
        "in Port Alder. Since then the town has built only in stone near the water."
    ),
    "festival": (
        "Every year on the third weekend of August, Port Alder holds the Lantern Festival. Boats "
        "decorated with paper lanterns sail in a line from the old pier to the river bend and "
        "back, and the keeper's bell of the lighthouse is rung once for every boat. The festival "
        "began in 1932, the year after the lighthouse lamp was electrified, to celebrate the new "
        "light. The festival's prize for the best decorated boat is a silver model of the "
        "lighthouse, made by a family of silversmiths in Brenmouth. The festival draws around "
        "twenty thousand visitors, more than twice the town's population."
    ),
    "archive": (
        "The valley archive in Tarn Hollow keeps records of the Vesk valley from the sixteenth "
        "century onward: parish books, maps, letters and the notebooks of several engineers. It "
        "occupies the former clockmaker's workshop on the village square and is open to the "
        "public on Wednesdays and Saturdays. Its most visited item is a hand-drawn plan of the "
        "Greywater Lighthouse with notes in the margin about the number of steps. The archive "
        "also holds the 1853 flood reports and the founding charter of Port Alder. Researchers "
        "must book a reading desk at least a week in advance."
    ),
}

QUESTIONS = [
    ("In which village was the designer of the Greywater Lighthouse born?", "Tarn Hollow"),
    ("How many steps does the staircase of the lighthouse on Port Alder's pier have?", "131"),
    ("In what year did the Lantern Festival begin?", "1932"),
]
